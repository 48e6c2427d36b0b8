"""A reward that fails on one kind of sample, to check the run stops naming it."""


def picky(prompts, completions, **kwargs):
    return [1.0 / (len(c) - len(c)) if "+ 3" in p else 0.0 for p, c in zip(prompts, completions, strict=True)]
