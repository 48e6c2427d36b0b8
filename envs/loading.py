"""Find an environment class from the string a recipe names it by (`env.path`), as rewards are found.

Three forms: `path/to/my_env.py:MyEnv` (a user's file; a relative path is resolved against the working directory),
`package.module:MyEnv`, and a bare built-in name (`python_tool`; see `BUILTIN_ENVS`). `env.args` are its constructor's
keyword arguments; one instance is built here at load time, so a missing file, a wrong name or a bad `args` fails
before any model is loaded. Either class form behind `openenv:` names an OpenEnv environment, run unchanged through
`openenv_adapter` (`env.args` are then the adapter's options).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from posttrain.envs.base import EnvLoadError
from posttrain.rewards.loading import RewardLoadError, load_object

BUILTIN_ENVS = {
    "python_tool": "posttrain.envs.python_tool:PythonTool",
    "calculator": "posttrain.envs.calculator:Calculator",
}
"""names accepted as `env.path` without a module (imported only when named)"""


def load_environment(
    spec: str, args: dict[str, Any] | None = None, base_dir: str | os.PathLike[str] | None = None
) -> Callable[[], Any]:
    """A factory of fresh environments (`factory()` builds one for each episode) from `spec` and `args`.

    Raises `EnvLoadError` naming `env.path` or `env.args` when the spec cannot be loaded, the class does not take
    `args`, or what it builds has no `reset` / `step` methods.
    """
    if spec.startswith("openenv:"):
        from posttrain.envs.openenv_adapter import openenv_factory  # openenv-core is optional: imported when named

        factory = openenv_factory(spec, args, base_dir)
    else:
        factory = _native_factory(spec, args, base_dir)
    try:
        probe = factory()
    except Exception as error:
        raise EnvLoadError(f"env.args = {args!r}: building {spec} with them failed: {error!r}") from error
    missing = [name for name in ("reset", "step") if not callable(getattr(probe, name, None))]
    if missing:
        raise EnvLoadError(
            f"env.path = {spec!r}: {type(probe).__name__} has no {' or '.join(missing)} method; an environment "
            "has reset(row) -> messages and step(messages) -> StepResult (posttrain.envs.Environment)"
        )
    return factory


def _native_factory(spec: str, args: dict[str, Any] | None, base_dir) -> functools.partial:
    if ":" not in spec and spec not in BUILTIN_ENVS:
        raise EnvLoadError(
            f"env.path = {spec!r}: not a built-in environment (built-ins: {sorted(BUILTIN_ENVS)}); name your own "
            "class as 'path/to/my_env.py:MyEnv' or 'package.module:MyEnv'"
        )
    try:
        cls = load_object(BUILTIN_ENVS.get(spec, spec), base_dir, what="environment")
    except RewardLoadError as error:
        raise EnvLoadError(f"env.path = {spec!r}: {error}") from None
    return functools.partial(cls, **(args or {}))
