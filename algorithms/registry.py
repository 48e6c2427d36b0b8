"""Every algorithm's one home: `ALGORITHMS` maps `algorithm.name` to its `AlgorithmSpec`.

A spec says how the algorithm trains (its advantage estimator, the learner loss, whether it needs a critic or a
teacher) and which recipe keys it reads. `config.py` takes the allowed names and the schema rule (a key the chosen
algorithm does not read is an error naming it) from here; the trainers look the spec up instead of comparing names.
Pure: no ray, no config import. How to add an algorithm: `docs/adding-an-algorithm.md`; the algorithms themselves:
`docs/algorithms.md`.

The estimators live in `algorithms/advantages.py` (GRPO, RLOO) and `algorithms/reinforce_pp.py` (REINFORCE++);
`online_advantages` runs the chosen one and puts the KL to the reference in the reward when asked. Online RFT has no
advantage (it keeps samples, `algorithms/rft.py`), nor has PPO (GAE with its critic, `online/ppo.py`) or OPD (the
teacher's per-token signal, `online/opd.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from posttrain.algorithms.advantages import group_relative_advantages, rloo_advantages
from posttrain.algorithms.kl import kl_penalized_rewards
from posttrain.algorithms.reinforce_pp import reinforce_pp_advantages

SequenceAdvantage = Callable[[Tensor, str], Tensor]
"""(rewards_BG [num_prompts, G] with NaN = skipped sample, algorithm.advantage_std) -> advantages_BG, 0 where
skipped. The KL (when algorithm.kl_in = reward) is already subtracted from the rewards."""
TokenAdvantage = Callable[[Tensor, Tensor, Tensor | None, float], Tensor]
"""(rewards_BG with NaN = skipped, mask_BC, kl_BC or None, kl_coef) -> advantages_BC, 0 on padding and skipped rows"""


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm: how it trains and which recipe keys it reads."""

    name: str
    family: Literal["online", "offline", "traces"]
    """online: generate, score and learn every step (Ray; `online/trainer.py`); offline: a dataset, in the CLI process
    (`offline/trainer.py`); traces: generate -> verify -> keep once, then SFT (`distill/`)"""
    doc: str
    """one line for `posttrain config --explain algorithm.name`"""
    reads: frozenset[str]
    """recipe sections (`ppo`) and keys (`algorithm.kl_coef`) it reads; any other key a recipe sets is an error"""
    learner_loss: str
    """online: `policy` (clipped surrogate), `sft` (NLL of kept samples) or `opd` (`opd_<opd.loss>`); offline: the
    objective of `offline/trainer.py` (`sft`, `dpo`, `orpo`, `reward_model`); traces: `sft`"""
    advantage: SequenceAdvantage | TokenAdvantage | None = None
    """online policy-gradient estimators: the function `online_advantages` runs"""
    advantage_level: Literal["sequence", "token"] | None = None
    """`sequence`: one advantage per completion (`SequenceAdvantage`); `token`: one per token (`TokenAdvantage`)"""
    needs_critic: bool = False
    """PPO's value model (`learner/critic.py`) trains next to the policy"""
    needs_teacher: bool = False
    """a teacher model: OPD's (`opd.teacher`) or distill's trace writer (`traces.teacher`)"""
    min_group_size: int = 1
    """samples per prompt its advantage needs (2 for a group baseline)"""
    notes: Mapping[str, str] = field(default_factory=dict)
    """why it refuses a key that others read (`algorithm.dynamic_sampling`: "ppo learns from every sample")"""

    def __post_init__(self) -> None:
        if (self.advantage is None) != (self.advantage_level is None):
            raise ValueError(f"AlgorithmSpec {self.name}: advantage and advantage_level go together")


# ------------------------------------------------------------------------------------------ what each one reads

RUN = frozenset({"name", "seed", "output_dir", "resume", "model", "data", "checkpoint", "algorithm.name"})
"""read by every algorithm"""
OPTIMIZER = frozenset(
    f"train.{key}"
    for key in (
        "steps",
        "lr",
        "lr_schedule",
        "warmup_steps",
        "weight_decay",
        "adam_betas",
        "max_grad_norm",
        "micro_batch_size",
        "num_threads",
    )
)
OFFLINE = RUN | OPTIMIZER | {"train.epochs", "train.batch_size", "train.max_length", "logging.progress"}
"""a dataset trainer in this process (`offline/trainer.py`)"""
ONLINE = (
    RUN
    | OPTIMIZER
    | {"rewards", "rollout", "eval", "scoring", "ray", "placement", "logging"}
    | {
        f"algorithm.{key}"
        for key in ("prompts_per_step", "samples_per_prompt", "kl_coef", "kl_in", "kl_estimator", "on_reward_error")
    }
    | {"algorithm.epochs_per_batch", "algorithm.mini_batches", "train.autocast", "train.micro_batch_tokens"}
)
"""any online algorithm (`online/trainer.py`)"""
CLIPPED = ONLINE | {
    f"algorithm.{key}" for key in ("eps_low", "eps_high", "dual_clip", "ratio_level", "tis_cap", "loss_reduction")
}
"""online with the clipped policy loss"""
POLICY_GRADIENT = CLIPPED | {"algorithm.dynamic_sampling", "algorithm.max_refill_rounds", "env"}
"""online with an advantage estimator (DAPO's dynamic sampling drops groups that carry no signal; `env`: multi-turn
episodes with an environment, docs/environments.md: an algorithm that reads `env` trains on episodes)"""
TRACES = (
    OFFLINE
    | {"rewards", "scoring", "ray", "traces", "sft.completion_only", "algorithm.on_reward_error"}
    | {f"rollout.{k}" for k in ("engine", "workers", "temperature", "top_p", "top_k", "max_new_tokens", "stop")}
    | {f"rollout.{k}" for k in ("max_batch_size", "num_threads", "gpu_memory_utilization", "kv_cache_gb")}
    | {f"eval.{k}" for k in ("data", "n", "temperature", "max_new_tokens", "accuracy_reward")}
)
"""generate traces on the rollout workers, score them, SFT the student, evaluate before and after (`distill/`)"""


# ---------------------------------------------------------------------------------------------- estimators


def grpo_advantage(rewards_BG: Tensor, std: str) -> Tensor:
    """GRPO: reward minus the group mean, over the group's (or batch's, or no) std."""
    return group_relative_advantages(rewards_BG, std=std)


def rloo_advantage(rewards_BG: Tensor, std: str) -> Tensor:
    """RLOO: reward minus the mean of the other G - 1 samples (no std)."""
    return rloo_advantages(rewards_BG)


def reinforce_pp_advantage(rewards_BG: Tensor, mask_BC: Tensor, kl_BC: Tensor | None, kl_coef: float) -> Tensor:
    """REINFORCE++: the reward minus the KL still to come at every token."""
    rewards_B = torch.nan_to_num(rewards_BG.reshape(-1), nan=0.0)  # skipped rows are masked out anyway
    kl = torch.zeros_like(mask_BC, dtype=rewards_B.dtype) if kl_BC is None else kl_BC
    return reinforce_pp_advantages(rewards_B, kl, mask_BC, kl_coef if kl_BC is not None else 0.0)


def reinforce_pp_baseline_advantage(
    rewards_BG: Tensor, mask_BC: Tensor, kl_BC: Tensor | None, kl_coef: float
) -> Tensor:
    """REINFORCE++ on rewards centred on their group mean (skipped samples left out); equals
    `reinforce_pp_advantages(group_size=G)` when nothing is skipped."""
    centred_BG = group_relative_advantages(rewards_BG, std="none")  # r - mean_group(r); skipped -> 0
    return reinforce_pp_advantage(centred_BG, mask_BC, kl_BC, kl_coef)


# ------------------------------------------------------------------------------------------------ registry


def _offline_notes(name: str) -> dict[str, str]:
    return {"eval": f"held-out evaluation is not available for {name} yet"}


ALGORITHMS: dict[str, AlgorithmSpec] = {}
"""algorithm.name -> spec; the config's allowed names are its keys (checked at validation time)"""


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add `spec` under `spec.name` (a name already taken is an error)."""
    if spec.name in ALGORITHMS:
        raise ValueError(f"register: algorithm {spec.name!r} exists already")
    ALGORITHMS[spec.name] = spec
    return spec


register(
    AlgorithmSpec(
        name="grpo",
        family="online",
        doc="GRPO: group-relative advantages, clipped policy loss (docs/algorithms.md#grpo)",
        reads=POLICY_GRADIENT | {"algorithm.advantage_std"},
        learner_loss="policy",
        advantage=grpo_advantage,
        advantage_level="sequence",
        min_group_size=2,
    )
)
register(
    AlgorithmSpec(
        name="rloo",
        family="online",
        doc="RLOO: leave-one-out baseline (docs/algorithms.md#rloo)",
        reads=POLICY_GRADIENT,
        learner_loss="policy",
        advantage=rloo_advantage,
        advantage_level="sequence",
        min_group_size=2,
    )
)
register(
    AlgorithmSpec(
        name="reinforce_pp",
        family="online",
        doc="REINFORCE++: the reward minus the per-token KL still to come (docs/algorithms.md#reinforce)",
        reads=POLICY_GRADIENT,
        learner_loss="policy",
        advantage=reinforce_pp_advantage,
        advantage_level="token",
    )
)
register(
    AlgorithmSpec(
        name="reinforce_pp_baseline",
        family="online",
        doc="REINFORCE++ on rewards centred on their group mean (docs/algorithms.md#reinforce)",
        reads=POLICY_GRADIENT,
        learner_loss="policy",
        advantage=reinforce_pp_baseline_advantage,
        advantage_level="token",
        min_group_size=2,
    )
)
register(
    AlgorithmSpec(
        name="rft",
        family="online",
        doc="online rejection-sampling fine-tuning: SFT on the best / verified samples (docs/algorithms.md#online-rft)",
        reads=ONLINE | {"algorithm.rft_keep", "algorithm.rft_min_reward", "env"},
        learner_loss="sft",
        notes={
            "algorithm.dynamic_sampling": "rft learns from groups that all pass too",
            "algorithm.tis_cap": "rft takes an SFT step (no importance ratio)",
        },
    )
)
register(
    AlgorithmSpec(
        name="opd",
        family="online",
        doc="on-policy distillation: a teacher grades every sampled token (docs/algorithms.md#on-policy-distillation)",
        reads=CLIPPED | {"opd", "algorithm.advantage_std"},
        learner_loss="opd",
        needs_teacher=True,
        notes={"algorithm.dynamic_sampling": "opd learns from every sample (the teacher grades each token)"},
    )
)
register(
    AlgorithmSpec(
        name="ppo",
        family="online",
        doc="PPO with a critic and GAE (docs/algorithms.md#ppo)",
        reads=CLIPPED | {"ppo", "env"},
        learner_loss="policy",
        needs_critic=True,
        notes={
            "algorithm.dynamic_sampling": "ppo learns from every sample (its critic's baseline needs no group variance)"
        },
    )
)
register(
    AlgorithmSpec(
        name="sft",
        family="offline",
        doc="supervised fine-tuning on a dataset (docs/algorithms.md#sft)",
        reads=OFFLINE | {"sft"},
        learner_loss="sft",
        notes=_offline_notes("sft"),
    )
)
register(
    AlgorithmSpec(
        name="dpo",
        family="offline",
        doc="DPO and its variants (IPO, hinge, robust) on preference pairs (docs/algorithms.md#dpo)",
        reads=OFFLINE | {f"preference.{k}" for k in ("beta", "loss_type", "label_smoothing", "precompute_reference")},
        learner_loss="dpo",
        notes=_offline_notes("dpo"),
    )
)
register(
    AlgorithmSpec(
        name="orpo",
        family="offline",
        doc="ORPO: chosen NLL plus an odds-ratio term, no reference model (docs/algorithms.md#orpo)",
        reads=OFFLINE | {"preference.orpo_lambda"},
        learner_loss="orpo",
        notes=_offline_notes("orpo"),
    )
)
register(
    AlgorithmSpec(
        name="reward_model",
        family="offline",
        doc="a Bradley-Terry reward model on preference pairs (docs/algorithms.md#reward-models)",
        reads=OFFLINE | {"reward_model"},
        learner_loss="reward_model",
        notes=_offline_notes("reward_model"),
    )
)
register(
    AlgorithmSpec(
        name="distill",
        family="traces",
        doc="a teacher's verified traces, then SFT (docs/distillation.md#offline-traces-verify-keep-sft)",
        reads=TRACES,
        learner_loss="sft",
        needs_teacher=True,
    )
)
register(
    AlgorithmSpec(
        name="rft_offline",
        family="traces",
        doc="the model's own verified traces, then SFT on them (docs/distillation.md#offline-rft)",
        reads=TRACES,
        learner_loss="sft",
    )
)


def names_of(family: str) -> tuple[str, ...]:
    """The registered names of one family, in registration order."""
    return tuple(name for name, spec in ALGORITHMS.items() if spec.family == family)


def reads(spec: AlgorithmSpec, key: str) -> bool:
    """Whether `spec` reads the dotted recipe `key` (it, or a section above it, is in `spec.reads`)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in spec.reads for i in range(1, len(parts) + 1))


def readers(key: str) -> list[str]:
    """The algorithms that read `key` or some key inside it."""
    return [n for n, s in ALGORITHMS.items() if reads(s, key) or any(r.startswith(key + ".") for r in s.reads)]


# ---------------------------------------------------------------------------------------------- dispatch


@dataclass
class Advantages:
    """Exactly one of the two is set."""

    sequence_B: Tensor | None = None
    """[B] per completion; 0 for skipped samples"""
    token_BC: Tensor | None = None
    """[B, C] per completion token; 0 on padding and on skipped samples"""


def online_advantages(
    name: str,
    rewards_BG: Tensor,
    mask_BC: Tensor,
    kl_BC: Tensor | None = None,
    kl_coef: float = 0.0,
    advantage_std: str = "group",
) -> Advantages:
    """Advantages of algorithm `name` for B = num_prompts * G completions (rows of `mask_BC` are the groups, in order).

    Args:
        name: a registered algorithm with an `advantage` (grpo, rloo, reinforce_pp, reinforce_pp_baseline, ...).
        rewards_BG: [num_prompts, G] sequence rewards; NaN = skipped sample (its row of `mask_BC` must be 0).
        mask_BC: [B, C] completion-token mask.
        kl_BC: [B, C] per-token KL estimate (no gradient) when the KL goes in the reward; `None` otherwise.
        kl_coef: weight of that KL in the reward.
        advantage_std: GRPO's denominator (`group`, `batch`, `none`).

    KL in the reward: a sequence-level estimator gets rewards less `kl_coef * sum_t KL_t` (`kl_penalized_rewards`)
    before its baseline; a token-level one gets the KL itself (REINFORCE++ subtracts the KL still to come at every
    token, its paper's return).
    """
    num_prompts, group = rewards_BG.shape
    if mask_BC.shape[0] != num_prompts * group:
        raise ValueError(f"online_advantages: mask has {mask_BC.shape[0]} rows for {num_prompts} x {group} rewards")
    if kl_BC is not None and kl_BC.shape != mask_BC.shape:
        raise ValueError(f"online_advantages: KL {tuple(kl_BC.shape)} must be shaped like the mask")
    spec = ALGORITHMS.get(name)
    if spec is None or spec.advantage is None:
        allowed = [n for n, s in ALGORITHMS.items() if s.advantage is not None]
        raise ValueError(
            f"online_advantages: no advantage estimator for {name!r} (an unknown algorithm, or one that trains "
            f"without one); allowed: {allowed}"
        )
    if spec.advantage_level == "sequence":
        if kl_BC is not None:
            rewards_B = kl_penalized_rewards(rewards_BG.reshape(-1), kl_BC, mask_BC, kl_coef)
            rewards_BG = rewards_B.view(num_prompts, group)  # [B] -> [num_prompts, G]
        return Advantages(sequence_B=spec.advantage(rewards_BG, advantage_std).reshape(-1))
    return Advantages(token_BC=spec.advantage(rewards_BG, mask_BC, kl_BC, kl_coef))
