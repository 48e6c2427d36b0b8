"""Find a reward function from the string a recipe names it by.

Three forms, no registry: `path/to/file.py:name` (a user's file, e.g. one written for TRL), `package.module:name`
(anything importable) and a bare built-in name (`math_accuracy`, `format`; see `builtin.BUILTIN_REWARDS`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from posttrain.rewards.builtin import BUILTIN_REWARDS

_FILE_MODULE_PREFIX = "posttrain_user_rewards_"


class RewardLoadError(ValueError):
    """A reward spec names no usable function; the message says which spec and what was wrong."""


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(spec: str, path: Path) -> ModuleType:
    """Import `path` as a module of its own; the name is unique per resolved path, so re-loading reuses it."""
    if not path.is_file():
        raise RewardLoadError(f"reward spec {spec!r}: file {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"{_FILE_MODULE_PREFIX}{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardLoadError(f"reward spec {spec!r}: cannot import {str(path)!r} as Python")
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
            raise RewardLoadError(f"reward spec {spec!r}: importing {str(path)!r} failed: {error!r}") from error
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(spec: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        raise RewardLoadError(
            f"reward spec {spec!r}: no module named {error.name!r} (a file path must end in .py)"
        ) from error
    except Exception as error:
        raise RewardLoadError(f"reward spec {spec!r}: importing module {target!r} failed: {error!r}") from error


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
    target, name = spec.rsplit(":", 1)
    if not target or not name:
        raise RewardLoadError(f"reward spec {spec!r}: expected 'path/to/file.py:function' or 'module:function'")
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else os.getcwd()) / path
        module = _import_file(spec, path.resolve())
    else:
        module = _import_module(spec, target)
    found: Any = module
    for part in name.split("."):
        if not hasattr(found, part):
            public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise RewardLoadError(f"reward spec {spec!r}: {module.__name__} has no {name!r} (callables: {public})")
        found = getattr(found, part)
    if not callable(found):
        raise RewardLoadError(f"reward spec {spec!r}: {name!r} is a {type(found).__name__}, not a function")
    return found
