"""Find a reward function from the string a recipe names it by.

Three forms, no registry: `path/to/file.py:name` (a user's file, e.g. one written for TRL), `package.module:name`
(anything importable) and a bare built-in name (`math_accuracy`, `format`; see `builtin.BUILTIN_REWARDS`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from posttrain.rewards.builtin import BUILTIN_REWARDS
from posttrain.rewards.combine import RewardSpec

_FILE_MODULE_PREFIX = "posttrain_user_rewards_"


class RewardLoadError(ValueError):
    """A reward spec names no usable function; the message says which spec and what was wrong."""


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(spec: str, path: Path, what: str) -> ModuleType:
    """Import `path` as a module of its own; the name is unique per resolved path, so re-loading reuses it."""
    if not path.is_file():
        raise RewardLoadError(f"{what} spec {spec!r}: file {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"{_FILE_MODULE_PREFIX}{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardLoadError(f"{what} spec {spec!r}: cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    # Sibling helper modules (`from my_utils import ...`) import as when the file is run as a script. Only
    # during the import: leaving the folder on sys.path would let its files shadow installed modules later.
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except BaseException as error:
        del sys.modules[module_name]
        if isinstance(error, Exception):
            raise RewardLoadError(f"{what} spec {spec!r}: importing {str(path)!r} failed: {error!r}") from error
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(spec: str, target: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        raise RewardLoadError(
            f"{what} spec {spec!r}: no module named {error.name!r} (a file path must end in .py)"
        ) from error
    except Exception as error:
        raise RewardLoadError(f"{what} spec {spec!r}: importing module {target!r} failed: {error!r}") from error


def load_reward_function(spec: str, base_dir: str | os.PathLike[str] | None = None) -> Callable[..., Any]:
    """The reward function named by `spec`; relative file paths are resolved against `base_dir` (default: cwd).

    `spec`: `path/to/file.py:name`, `package.module:name` (`name` may be dotted, e.g. `Class.method`) or a
    built-in name. Raises `RewardLoadError` naming the spec when the file, module or name is missing, or the
    object found is not callable.
    """
    if ":" not in spec:
        if spec in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[spec]
        raise RewardLoadError(
            f"reward spec {spec!r}: not a built-in reward (built-ins: {sorted(BUILTIN_REWARDS)}); name your own "
            "function as 'path/to/file.py:function' or 'package.module:function'"
        )
    return load_object(spec, base_dir)


def load_object(spec: str, base_dir: str | os.PathLike[str] | None = None, what: str = "reward") -> Any:
    """The callable named by `path/to/file.py:name` or `package.module:name` (`name` may be dotted); relative file
    paths are resolved against `base_dir` (default: cwd). Raises `RewardLoadError` saying "<what> spec <spec>: ..."
    when the file, module or name is missing, or the object found is not callable. Rewards and environments
    (`envs/loading.py`) are both loaded here."""
    target, name = spec.rsplit(":", 1) if ":" in spec else ("", spec)
    if not target or not name:
        raise RewardLoadError(f"{what} spec {spec!r}: expected 'path/to/file.py:name' or 'module:name'")
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else os.getcwd()) / path
        module = _import_file(spec, path.resolve(), what)
    else:
        module = _import_module(spec, target, what)
    found: Any = module
    for part in name.split("."):
        if not hasattr(found, part):
            public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise RewardLoadError(f"{what} spec {spec!r}: {module.__name__} has no {name!r} (callables: {public})")
        found = getattr(found, part)
    if not callable(found):
        raise RewardLoadError(f"{what} spec {spec!r}: {name!r} is a {type(found).__name__}, not a function or class")
    return found


def build_reward_specs(entries: list[dict[str, Any]], names: list[str], base_dir: str = ".") -> list[RewardSpec]:
    """Recipe `rewards:` entries (`fn`, `weight`, `args`) -> specs, each function loaded and its `args` bound and
    checked; a bad entry raises `RewardLoadError` naming `rewards[i]`."""
    specs = []
    for i, (entry, name) in enumerate(zip(entries, names, strict=True)):
        try:
            fn = load_reward_function(entry["fn"], base_dir=base_dir)
        except Exception as err:
            raise RewardLoadError(f"rewards[{i}].fn = {entry['fn']!r}: {err}") from None
        fn = _bind_args(fn, entry.get("args") or {}, f"rewards[{i}] ({entry['fn']})")
        specs.append(RewardSpec(fn, name, entry.get("weight", 1.0), source=f"rewards[{i}].fn = {entry['fn']!r}"))
    return specs


def _bind_args(fn, args: dict, where: str):
    """`functools.partial(fn, **args)` (or `fn` itself without args), refusing arguments the function cannot take,
    missing required keyword-only ones and values its `fn.check_args(**args)` rejects (ValueError or TypeError), so a
    wrong `args:` fails before any work rather than mid-run."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return functools.partial(fn, **args) if args else fn
    params = signature.parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    unknown = [k for k in args if k not in signature.parameters and not takes_any]
    missing = [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty and p.name not in args
    ]
    if unknown or missing:
        problem = f"takes no argument {unknown}" if unknown else f"needs {missing}"
        raise RewardLoadError(f"{where}.args: {fn.__name__} {problem}; its parameters: {list(signature.parameters)}")
    check = getattr(fn, "check_args", None)  # a built-in's own check of its values (e.g. llm_judge's template)
    if check is not None:
        try:
            check(**args)
        except (TypeError, ValueError) as error:
            raise RewardLoadError(f"{where}.args: {error}") from None
    return functools.partial(fn, **args) if args else fn


def check_columns(specs: list[RewardSpec], rows: list[dict[str, Any]], where: str) -> None:
    """Before any generation: each reward's declared dataset columns (`fn.required_columns`, a tuple whose items are
    a column or a tuple of alternatives) are among `rows`' keys; else `RewardLoadError` naming the reward and `where`
    (e.g. `data`). Functions that declare nothing are not checked (a missing keyword then fails at their first call)."""
    columns = {key for row in rows for key in row} - {"prompt"}
    for spec in specs:
        fn = spec.fn
        while isinstance(fn, functools.partial):  # `args:` bound
            fn = fn.func
        for need in getattr(fn, "required_columns", ()):
            options = (need,) if isinstance(need, str) else tuple(need)
            if rows and not columns.intersection(options):
                wanted = " or ".join(f"`{column}`" for column in options)
                raise RewardLoadError(
                    f"{spec.source or spec.name} needs the dataset column {wanted}, but the rows of {where} have "
                    f"{sorted(columns)}; add it to the dataset"
                )
