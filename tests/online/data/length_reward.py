"""A user reward file, written the way a TRL user would: it gives a random tiny model reward variance."""


def length_reward(prompts, completions, **kwargs):
    return [min(len(c), 40) / 40 for c in completions]
