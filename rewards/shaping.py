"""Length shaping rewards, in TRL's reward-function interface; bind their parameters with `args:` in a recipe.

```yaml
rewards:
  - {fn: overlong_penalty, args: {max_tokens: 512, cache_tokens: 128}}
  - {fn: length_penalty, args: {max_tokens: 512, coef: 0.1}}
```
Lengths are counted in completion tokens (`completion_ids`, which the trainer always passes).
"""

from __future__ import annotations

from typing import Any


def _token_counts(completion_ids: list[list[int]] | None, fn: str) -> list[int]:
    if completion_ids is None:
        raise TypeError(f"{fn} needs `completion_ids` (token ids of each completion) to count tokens")
    return [len(ids) for ids in completion_ids]


def overlong_penalty(
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None = None,
    *,
    max_tokens: int,
    cache_tokens: int,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2503.14476, eq. 13), per completion of |y| tokens:

    0 when |y| <= max_tokens - cache_tokens; ((max_tokens - cache_tokens) - |y|) / cache_tokens, falling
    linearly from 0 to -1, inside the last `cache_tokens`; -1 beyond `max_tokens`. Add it to a correctness reward.
    """
    if not 0 < cache_tokens <= max_tokens:
        raise ValueError(f"overlong_penalty: need 0 < cache_tokens <= max_tokens, got {cache_tokens}, {max_tokens}")
    free = max_tokens - cache_tokens
    return [
        0.0 if n <= free else (free - n) / cache_tokens if n <= max_tokens else -1.0
        for n in _token_counts(completion_ids, "overlong_penalty")
    ]


def length_penalty(
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None = None,
    *,
    max_tokens: int,
    coef: float = 1.0,
    **kwargs: Any,
) -> list[float]:
    """A linear cost on length: `-coef * min(|y|, max_tokens) / max_tokens` (0 for an empty completion, -coef at
    the cap). Prefer `overlong_penalty` to only discourage truncation; this one pushes every answer shorter."""
    if max_tokens <= 0:
        raise ValueError(f"length_penalty: max_tokens must be > 0, got {max_tokens}")
    return [-coef * min(n, max_tokens) / max_tokens for n in _token_counts(completion_ids, "length_penalty")]
