"""A reward on environment transcripts (tests/online/test_env_rewards.py): its value follows from the transcript's
shape (assistant turns, prompt messages), so a test can check it without seeing the call; in-process scoring also
keeps each call's arguments in CALLS."""

CALLS: list[dict] = []


def transcript_reward(prompts, completions, completion_ids, **columns):
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns})
    # chat messages only: a string prompt or completion fails here (`m["role"]` on a character)
    turns = [sum(m["role"] == "assistant" for m in completion) for completion in completions]
    return [t / 10 + len(prompt) / 100 for t, prompt in zip(turns, prompts, strict=True)]
