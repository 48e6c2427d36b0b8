"""A model that reward functions use, loaded once per Ray job in a named actor that every reward worker shares.

`reward_model` (a sequence-classification scorer) and `llm_judge` (a rollout worker generating verdicts) both keep
their model here: the first reward worker that calls starts the actor, the others find it by name, so the model is
loaded once and the workers' batches queue on the one copy.
"""

from __future__ import annotations

import hashlib
from typing import Any

_ACTORS: dict[str, Any] = {}
"""this process's handles by actor name (a Ray actor nobody holds a handle to is destroyed, even a named one)"""


def actor_name(prefix: str, settings: tuple) -> str:
    """`prefix` + a digest of the settings that make two loaded models interchangeable (path, dtype, ...)."""
    return prefix + hashlib.sha1(repr(settings).encode()).hexdigest()[:16]


def call_shared_actor(
    name: str, actor_class: Any, init_args: tuple, num_gpus: float, method: str, *args: Any, what: str
) -> Any:
    """`ray.get(actor.<method>.remote(*args))` on the named actor `name`, started from `actor_class` (a Ray actor
    class with a `ready` method) with `init_args` when none runs yet. An actor whose owner (another reward worker,
    since replaced) died is started again, once. `what` names the model in a load failure: RuntimeError
    "`what`: cannot load: <the actor's own error>"."""
    from ray.exceptions import RayActorError

    try:
        return _call(name, actor_class, init_args, num_gpus, what, method, args)
    except RayActorError:
        _ACTORS.pop(name, None)
        return _call(name, actor_class, init_args, num_gpus, what, method, args)


def _call(name: str, actor_class: Any, init_args: tuple, num_gpus: float, what: str, method: str, args: tuple) -> Any:
    import ray

    if name not in _ACTORS:
        _ACTORS[name] = _start(name, actor_class, init_args, num_gpus, what)
    return ray.get(getattr(_ACTORS[name], method).remote(*args))


def _start(name: str, actor_class: Any, init_args: tuple, num_gpus: float, what: str) -> Any:
    import ray
    from ray.exceptions import RayActorError

    actor = actor_class.options(name=name, get_if_exists=True, num_cpus=0, num_gpus=num_gpus, lifetime=None).remote(
        *init_args
    )
    try:
        ray.get(actor.ready.remote())
    except RayActorError as error:  # a model that cannot load fails here, with its own message
        raise RuntimeError(f"{what}: cannot load: {getattr(error, 'cause', None) or error}") from None
    return actor
