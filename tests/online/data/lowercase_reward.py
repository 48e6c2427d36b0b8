"""A toy task a tiny random model can learn in a few steps: write lowercase letters (about 1 character in 8 at the
start, from the random init)."""


def lowercase_fraction(prompts, completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.islower() for ch in text) / max(len(text), 1) for text in texts]
