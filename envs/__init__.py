"""Multi-turn environments: the interface (`Environment`, `StepResult`), loading a user's class (`env.path`), and
the episode runner that turns them into training samples whose loss covers the model's own tokens only.
See docs/environments.md."""

from posttrain.envs.base import ERROR_KINDS, Environment, EpisodeError, Message, StepResult
from posttrain.envs.episodes import EpisodeLimits, EpisodeResult, run_episodes
from posttrain.envs.loading import EnvLoadError, load_environment
from posttrain.envs.template import ChatTemplateError

__all__ = [
    "ERROR_KINDS",
    "ChatTemplateError",
    "EnvLoadError",
    "Environment",
    "EpisodeError",
    "EpisodeLimits",
    "EpisodeResult",
    "Message",
    "StepResult",
    "load_environment",
    "run_episodes",
]
