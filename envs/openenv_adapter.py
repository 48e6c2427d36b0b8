"""Run an OpenEnv environment (`openenv-core`) unchanged, in this process, as a posttrain environment.

An OpenEnv environment is Gym-style, not chat-style: `reset(seed, episode_id, **kwargs) -> Observation` and
`step(Action) -> Observation`, where `Action` / `Observation` are the environment's own pydantic classes and the
observation carries `done` and `reward`. The adapter maps text both ways and nothing else:

- the model's turn becomes `ActionClass(**{action_field: text})`;
- an observation becomes one message (role `role`) whose content is the observation's `observation_field`;
- `reset` gets the keyword arguments `reset_kwargs` names, taken from the dataset row's columns (so the
  `samples_per_prompt` episodes of a row play the same task);
- each step's reward is the observation's `reward` (an environment with a `Rubric` sets it there, as OpenEnv's
  `_apply_rubric` does); `done` ends the episode and closes the environment.

Where the environment overrides `reset_async` / `step_async`, those run, on an event loop of the episode's own (so
loop-bound resources live as long as the episode). `SUPPORTS_CONCURRENT_SESSIONS` is honoured as OpenEnv's server
does: posttrain runs one instance per episode, all of a step's at once, so a class that does not declare its instances
independent is refused unless the recipe vouches for it (`concurrent: true`). `REQUIRES_SINGLE_THREAD_EXECUTOR`
puts every call of that class on one thread, as OpenEnv's server does.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from posttrain.envs.base import Environment, EnvLoadError, Message, StepResult
from posttrain.rewards.loading import RewardLoadError, load_object

PREFIX = "openenv:"
"""`env.path` = `openenv:<file.py or package.module>:<Class>` names an OpenEnv environment class"""

_BASE_OBSERVATION_FIELDS = {"done", "reward", "metadata"}


class OpenEnvOptions(BaseModel):
    """`env.args` of an `openenv:` environment: how text maps onto its actions and observations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env_args: dict[str, Any] = {}
    """keyword arguments of the OpenEnv environment's constructor"""
    action_field: str | None = None
    """the Action field that receives the model's text; default: the Action's only `str` field"""
    observation_field: str | None = None
    """the Observation field shown to the model; default: the Observation's only `str` field"""
    action_class: str | None = None
    """the Action class (`file.py:Name` or `module:Name`); default: from `Environment[Action, Observation, State]` or
    the annotation of `step`'s `action`"""
    reset_kwargs: dict[str, str] = {}
    """`reset` keyword -> dataset column, e.g. `{seed: seed}`"""
    role: str = "user"
    """the role of the observation messages"""
    system_prompt: str | None = None
    """a system message before the first observation"""
    concurrent: bool = False
    """run many instances at once although the class does not set SUPPORTS_CONCURRENT_SESSIONS"""


def openenv_factory(spec: str, args: dict[str, Any] | None, base_dir) -> functools.partial:
    """A factory of adapters, one fresh OpenEnv environment each, for `env.path = spec` (`openenv:...`) and
    `env.args = args`; raises `EnvLoadError` naming the key that is wrong."""
    try:
        from openenv.core.env_server.interfaces import Environment as OpenEnvEnvironment
    except ImportError as error:
        raise EnvLoadError(
            f"env.path = {spec!r}: OpenEnv environments need the openenv-core package (pip install "
            f"'posttrain[envs]'): {error!r}"
        ) from None
    try:
        options = OpenEnvOptions(**(args or {}))
    except ValidationError as error:
        raise EnvLoadError(
            f"env.args of {spec!r} (the OpenEnv adapter's options; the environment's own constructor arguments go "
            f"under env.args.env_args): {error}"
        ) from None
    env_cls = _load(spec, spec[len(PREFIX) :], base_dir, "env.path")
    if not (isinstance(env_cls, type) and issubclass(env_cls, OpenEnvEnvironment)):
        raise EnvLoadError(f"env.path = {spec!r}: {env_cls!r} is not an openenv Environment subclass")
    if not (env_cls.SUPPORTS_CONCURRENT_SESSIONS or options.concurrent):
        raise EnvLoadError(
            f"env.path = {spec!r}: {env_cls.__name__}.SUPPORTS_CONCURRENT_SESSIONS is False (OpenEnv's server would "
            "serve one session at a time), while posttrain runs one instance per episode, all of a step's at once; "
            "set env.args.concurrent: true if its instances share no state"
        )
    action_cls = _action_class(env_cls, options, base_dir)
    action_field = _text_field(action_cls, options.action_field, "env.args.action_field", set())
    others = [name for name, info in action_cls.model_fields.items() if info.is_required() and name != action_field]
    if others:
        raise EnvLoadError(
            f"env.args.action_field = {action_field!r}: {action_cls.__name__} also requires {others}, which the "
            "model's text cannot fill; only actions with one required text field are supported"
        )
    observation_field = _observation_field(env_cls, options.observation_field)
    mapping = TextMapping(env_cls.__name__, action_cls, action_field, options, observation_field)
    adapter = type(f"OpenEnv:{env_cls.__name__}", (OpenEnvAdapter,), {})  # episode errors name the real class
    return functools.partial(adapter, env_cls, mapping)


@dataclass(frozen=True)
class TextMapping:
    name: str
    action_cls: type
    action_field: str
    options: OpenEnvOptions
    observation_field: str | None
    """None when the Observation class is not known before the first observation"""


class OpenEnvAdapter(Environment):
    """One episode of an OpenEnv environment; built by `openenv_factory`."""

    def __init__(self, env_cls: type, mapping: TextMapping):
        self.mapping = mapping
        self.env = env_cls(**mapping.options.env_args)
        self.executor = _single_thread_executor(env_cls) if env_cls.REQUIRES_SINGLE_THREAD_EXECUTOR else None
        self.loop: asyncio.AbstractEventLoop | None = None

    def reset(self, row: dict[str, Any]) -> list[Message]:
        options = self.mapping.options
        missing = sorted(set(options.reset_kwargs.values()) - set(row))
        if missing:
            raise KeyError(f"env.args.reset_kwargs names columns {missing} the row lacks (it has {sorted(row)})")
        observation = self._call("reset", **{key: row[column] for key, column in options.reset_kwargs.items()})
        if observation.done:
            raise ValueError(f"{self.mapping.name}.reset returned an observation with done=True")
        system = [{"role": "system", "content": options.system_prompt}] if options.system_prompt is not None else []
        return [*system, {"role": options.role, "content": self._text(observation, "reset")}]

    def step(self, messages: list[Message]) -> StepResult:
        mapping = self.mapping
        action = mapping.action_cls(**{mapping.action_field: messages[-1]["content"]})
        observation = self._call("step", action)
        text = self._text(observation, "step")
        reward = None if observation.reward is None else float(observation.reward)  # OpenEnv allows bool rewards
        if observation.done:
            self._close()
        reply = [{"role": mapping.options.role, "content": text}] if text or not observation.done else []
        return StepResult(reply, reward, bool(observation.done))

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """`env.<name>(...)`, or its `<name>_async` where the class overrides that; on the class's single thread
        when it requires one. Checks that an Observation came back."""
        from openenv.core.env_server.interfaces import Environment as OpenEnvEnvironment
        from openenv.core.env_server.types import Observation

        is_async = getattr(type(self.env), f"{name}_async") is not getattr(OpenEnvEnvironment, f"{name}_async")
        if is_async:
            coroutine = getattr(self.env, f"{name}_async")

            def run() -> Any:
                self.loop = self.loop or asyncio.new_event_loop()
                return self.loop.run_until_complete(coroutine(*args, **kwargs))
        else:
            run = functools.partial(getattr(self.env, name), *args, **kwargs)
        result = self.executor.submit(run).result() if self.executor else run()
        if not isinstance(result, Observation):
            what = f"{self.mapping.name}.{name}{'_async' if is_async else ''}"
            raise TypeError(f"{what} returned {type(result).__name__}, not an openenv Observation")
        return result

    def _text(self, observation: Any, where: str) -> str:
        name = self.mapping.observation_field or _text_field(
            type(observation), None, "env.args.observation_field", _BASE_OBSERVATION_FIELDS
        )
        value = getattr(observation, name, None)
        if not isinstance(value, str):
            raise TypeError(
                f"{self.mapping.name}.{where}: {type(observation).__name__}.{name} is {value!r}, not text "
                "(env.args.observation_field)"
            )
        return value

    def _close(self) -> None:
        self.env.close()
        if self.loop is not None:
            self.loop.close()
            self.loop = None


def _load(spec: str, target: str, base_dir, key: str) -> Any:
    try:
        return load_object(target, base_dir, what="OpenEnv class")
    except RewardLoadError as error:
        raise EnvLoadError(f"{key} = {spec!r}: {error}") from None


def _generic_args(env_cls: type) -> tuple:
    """`(Action, Observation, State)` of `class MyEnv(Environment[Action, Observation, State])`, else `()`."""
    from openenv.core.env_server.interfaces import Environment as OpenEnvEnvironment

    for klass in env_cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            if typing.get_origin(base) is OpenEnvEnvironment and all(isinstance(a, type) for a in args):
                return args
    return ()


def _action_class(env_cls: type, options: OpenEnvOptions, base_dir) -> type:
    from openenv.core.env_server.types import Action

    if options.action_class is not None:
        found = _load(options.action_class, options.action_class, base_dir, "env.args.action_class")
    else:
        found = (_generic_args(env_cls) or (None,))[0]
        if found is None:
            try:
                found = typing.get_type_hints(env_cls.step).get("action")
            except Exception:  # noqa: BLE001 - an unresolvable annotation only means: not declared
                found = None
    if not (isinstance(found, type) and issubclass(found, Action)):
        raise EnvLoadError(
            f"env.args.action_class: {env_cls.__name__}'s Action class is {found!r}, not an openenv Action; declare "
            "it (Environment[MyAction, MyObservation, State]) or name it as env.args.action_class"
        )
    return found


def _observation_field(env_cls: type, named: str | None) -> str | None:
    """The observation field to show, checked against the declared Observation class when there is one."""
    declared = _generic_args(env_cls)
    if len(declared) < 2:
        return named  # checked on the first observation
    return _text_field(declared[1], named, "env.args.observation_field", _BASE_OBSERVATION_FIELDS)


def _text_field(model: type, named: str | None, key: str, skip: set[str]) -> str:
    """`named` if the pydantic `model` has it, else its only `str` field outside `skip` and `metadata`."""
    model_fields = {name: info for name, info in model.model_fields.items() if name not in skip | {"metadata"}}
    if named is not None:
        if named not in model_fields or model_fields[named].annotation is not str:
            raise EnvLoadError(f"{key} = {named!r}: {model.__name__} has no such str field ({sorted(model_fields)})")
        return named
    texts = [name for name, info in model_fields.items() if info.annotation is str]
    if len(texts) != 1:
        raise EnvLoadError(
            f"{key}: {model.__name__} has {len(texts)} str fields {texts}, so which one holds the text is not "
            f"clear; name it as {key} (fields: {sorted(model_fields)})"
        )
    return texts[0]


_EXECUTORS: dict[type, ThreadPoolExecutor] = {}
_EXECUTORS_LOCK = threading.Lock()


def _single_thread_executor(env_cls: type) -> ThreadPoolExecutor:
    """One thread for every call of every instance of `env_cls` (REQUIRES_SINGLE_THREAD_EXECUTOR)."""
    with _EXECUTORS_LOCK:
        if env_cls not in _EXECUTORS:
            _EXECUTORS[env_cls] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"openenv-{env_cls.__name__}")
        return _EXECUTORS[env_cls]
