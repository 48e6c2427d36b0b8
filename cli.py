"""`posttrain train RECIPE.yaml key=value ...`, `posttrain eval RECIPE.yaml [--model PATH] key=value ...` and
`posttrain config --explain KEY`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from posttrain.config import ConfigError, load_config

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's input at fault: printed as one message, no traceback."""
    from posttrain.data.sources import DataError
    from posttrain.rewards.combine import RewardError
    from posttrain.rewards.loading import RewardLoadError
    from posttrain.run_folder.run_dir import CheckpointError

    return USER_ERRORS + (DataError, RewardError, RewardLoadError, CheckpointError)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if cfg.algorithm.spec.family == "offline":  # a dataset in, no rollouts: runs here, without Ray
        from posttrain.offline.trainer import run_offline

        run_offline(cfg)
        return 0
    if cfg.algorithm.spec.family == "traces":  # generate -> verify -> keep, then SFT the student
        from posttrain.distill.pipeline import run_distill

        run_distill(cfg)
        return 0
    from posttrain.online.trainer import run_grpo

    run_grpo(cfg)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if cfg.algorithm.spec.family != "traces":
        raise ConfigError(
            f"{args.recipe}: `posttrain distill` runs algorithm.name distill or rft_offline, got {cfg.algorithm.name}"
        )
    return cmd_train(args)


def cmd_config(args: argparse.Namespace) -> int:
    from posttrain.config_explain import explain

    print(explain(args.explain))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
    cfg = load_config(args.recipe, overrides)
    if cfg.eval.data is None:
        raise ConfigError(f"{args.recipe}: `eval.data` is not set; add an eval dataset to the recipe or override it")
    if not cfg.rewards and cfg.env.path is None:  # an opd recipe may have none; an environment rewards its episodes
        raise ConfigError(
            f"{args.recipe}: `rewards` is empty; evaluation scores accuracy with the recipe's rewards or its `env`"
        )
    from posttrain.online.evaluation import evaluate_recipe

    result = evaluate_recipe(cfg)
    print(f"{'metric':<32}{'value':>10}")
    for key, value in result["metrics"].items():
        print(f"{key:<32}{value:>10.4f}")
    out = Path(args.output or Path(cfg.output_dir) / f"eval-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="RL post-training for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training recipe")
    train.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=5 resume=runs/x")
    train.set_defaults(func=cmd_train)
    distill = sub.add_parser("distill", help="teacher traces -> verify -> keep -> SFT the student (a distill recipe)")
    distill.add_argument("recipe", help="a recipe with algorithm.name distill or rft_offline")
    distill.add_argument("overrides", nargs="*", help="key=value overrides, e.g. traces.samples_per_prompt=8")
    distill.set_defaults(func=cmd_distill)
    config = sub.add_parser("config", help="explain the recipe schema")
    config.add_argument(
        "--explain", required=True, metavar="KEY", help="a key or section, e.g. algorithm.kl_coef, ppo, algorithm.name"
    )
    config.set_defaults(func=cmd_config)
    ev = sub.add_parser("eval", help="evaluate a model on a recipe's eval set with its rewards")
    ev.add_argument("recipe", help="the recipe whose eval data, rewards and model to use")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.n=8 eval.temperature=1.0")
    ev.add_argument("--model", help="a model folder to evaluate instead of the recipe's (e.g. runs/<run>/final)")
    ev.add_argument("--output", help="where to write the JSON results")
    ev.set_defaults(func=cmd_eval)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like `parse_args`, but `key=value` overrides may come after options too (`eval R --model X eval.n=8`):
    argparse ends a positional list at the first option and would refuse what follows."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint can be resumed with resume=<run folder>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
