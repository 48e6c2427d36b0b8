"""The package's import structure, read from the source with `ast` (imports at the top and inside functions alike):
no import cycles, no private names borrowed across modules, the layer rules below, and the learner and engine
classes importable where Ray is not installed (a GPU test machine has torch, transformers and peft but no ray)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""the repository root, which is the package `posttrain`"""
NOT_PACKAGE = {"tests", "bench"}
"""top-level folders of the repository that are not part of the package (tests, benchmark scripts)"""


def module_name(path: Path) -> str:
    parts = ("posttrain", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


BUILD_OUTPUT = {"build", "dist", "runs"}
"""what installs and runs leave in the checkout (git-ignored): copies of the package, not modules of it"""


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (`posttrain.learner.learner`)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        top = path.relative_to(ROOT).parts[0]
        if top in NOT_PACKAGE or top in BUILD_OUTPUT or top.startswith(".") or top.endswith(".egg-info"):
            continue
        modules[module_name(path)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in the file, at any depth. `from a import b`
    counts as importing module `a.b` when that is a module of the package, else as importing name `b` of `a`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module_name(path).split(".")
                package = package[: len(package) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, str | None, int]]]:
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def module_edges(graph) -> dict[str, set[str]]:
    return {
        m: {target for target, _, _ in found if target.startswith("posttrain") and target != m}
        for m, found in graph.items()
    }


def in_package(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


STDLIB = set(sys.stdlib_module_names) | {"__future__"}
LAYER_RULES: list[tuple[str, str, object]] = [
    (
        "posttrain.algorithms",
        "pure math: imports neither ray nor the config schema nor learner/online/rollout",
        lambda target: (
            not any(
                in_package(target, p)
                for p in ("ray", "posttrain.config", "posttrain.learner", "posttrain.online", "posttrain.rollout")
            )
        ),
    ),
    (
        "posttrain.verifiers",
        "pure checkers: only the standard library, sympy and other verifiers modules",
        lambda target: target.split(".")[0] in STDLIB | {"sympy"} or in_package(target, "posttrain.verifiers"),
    ),
    (
        "posttrain.models",
        "models import no rollout, learner or online code",
        lambda target: (
            not any(in_package(target, p) for p in ("posttrain.rollout", "posttrain.learner", "posttrain.online"))
        ),
    ),
    (
        "posttrain.offline",
        "offline training runs without Ray: no ray, learner, online or rollout imports",
        lambda target: (
            not any(
                in_package(target, p) for p in ("ray", "posttrain.learner", "posttrain.online", "posttrain.rollout")
            )
        ),
    ),
    ("posttrain", "nothing imports the command line", lambda target: not in_package(target, "posttrain.cli")),
]
"""(package, what the rule says, allowed(imported module) -> bool); a module of `package` may import only what
`allowed` accepts"""


def layer_violations(graph) -> list[str]:
    problems: dict[str, None] = {}  # ordered, one entry per import statement (`from a import b, c` is one)
    for module, found in sorted(graph.items()):
        for package, rule, allowed in LAYER_RULES:
            if not in_package(module, package) or module == "posttrain.cli":
                continue
            for target, _, line in found:
                if not allowed(target):
                    problems[f"{module} (line {line}) imports {target}: {rule}"] = None
    return list(problems)


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(module_edges(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_a_private_name_of_another():
    borrowed = [
        f"{module} (line {line}) imports {name} from {target}"
        for module, found in sorted(import_graph().items())
        for target, name, line in found
        if name and name.startswith("_") and target.startswith("posttrain") and target != module
    ]
    assert not borrowed, "private names used across modules (make them public where they belong):\n" + "\n".join(
        borrowed
    )


def test_layer_rules_hold():
    problems = layer_violations(import_graph())
    assert not problems, "layer rules broken:\n" + "\n".join(problems)


def test_layer_rules_catch_each_kind_of_violation():
    """The rules are not vacuous: a made-up module breaking each one is reported (and a clean one is not)."""
    fake = {
        "posttrain.algorithms.x": [("ray", None, 1), ("posttrain.config", "RecipeConfig", 2), ("torch", None, 3)],
        "posttrain.verifiers.y": [("torch", None, 1), ("sympy", None, 2), ("posttrain.verifiers.pool", None, 3)],
        "posttrain.models.z": [("posttrain.rollout.types", "SamplingParams", 1)],
        "posttrain.offline.w": [("posttrain.learner.learner", "lr_lambda", 1), ("posttrain.models.training", None, 2)],
        "posttrain.distill.v": [("posttrain.cli", "evaluate_recipe", 1)],
    }
    assert layer_violations(fake) == [
        "posttrain.algorithms.x (line 1) imports ray: " + LAYER_RULES[0][1],
        "posttrain.algorithms.x (line 2) imports posttrain.config: " + LAYER_RULES[0][1],
        "posttrain.distill.v (line 1) imports posttrain.cli: " + LAYER_RULES[4][1],
        "posttrain.models.z (line 1) imports posttrain.rollout.types: " + LAYER_RULES[2][1],
        "posttrain.offline.w (line 1) imports posttrain.learner.learner: " + LAYER_RULES[3][1],
        "posttrain.verifiers.y (line 1) imports torch: " + LAYER_RULES[1][1],
    ]


NO_RAY = """
import sys

class NoRay:
    # a meta-path finder that makes `ray` look not installed
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoRay())
"""
WITHOUT_RAY = (
    "posttrain.learner.learner",
    "posttrain.learner.critic",
    "posttrain.learner.teacher",
    "posttrain.learner.data_parallel",
    "posttrain.learner.fsdp",
    "posttrain.rollout.hf_engine",
    "posttrain.rollout.buckets",
    "posttrain.rollout.weight_sender",
    "posttrain.models.training",
    "posttrain.offline.trainer",
)
"""what must import where ray is not installed: the actor classes' implementations, the hf engine, the weight-sync
packing and the learner's sending end, the offline trainer"""


def test_learner_and_engine_classes_import_without_ray():
    code = NO_RAY + f"import {', '.join(WITHOUT_RAY)}\nassert 'ray' not in sys.modules\nprint(posttrain.__file__)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()) == ROOT / "__init__.py"  # this checkout's package was the one imported
    blocked = subprocess.run([sys.executable, "-c", NO_RAY + "import ray"], capture_output=True, text=True)
    assert "No module named 'ray'" in blocked.stderr  # the prelude really hides ray
