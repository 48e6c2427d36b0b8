"""Rewards for a random tiny model, whose completions all run to the token cap: `varied` scores the characters of the
completion (so groups have reward variance); `half_constant` is constant on about half the prompts (zero-variance
groups) and `varied` on the others, so dynamic sampling has groups to drop and refill."""


def varied(prompts, completions, **kwargs):
    return [sum(map(ord, str(c))) % 10 / 10 for c in completions]


def half_constant(prompts, completions, **kwargs):
    def constant(prompt) -> bool:
        return sum(int(ch) for ch in str(prompt) if ch.isdigit()) % 2 == 0

    scores = varied(prompts, completions)
    return [1.0 if constant(p) else s for p, s in zip(prompts, scores, strict=True)]
