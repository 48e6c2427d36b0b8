"""Token ids of an episode without re-tokenizing its history: the chat template's text between two model turns.

An episode's tokens are the prompt's, then the model's own ids exactly as the engine sampled them, then the ids of
the text the chat template puts between that turn and the next generation (the end of the assistant turn, the
environment's messages, the next assistant header), and so on. That in-between text is a difference of two
renderings: the template on the history with the new messages and the generation prompt, minus the template on the
history before the model's turn (with the generation prompt), minus the model's own text. Only that suffix is
tokenized, so the ids the model produced are never re-tokenized (which could merge or split them differently and
make the learner train on tokens the engine never sampled).

This needs the template to be append-only: rendering a longer conversation starts with the rendering of the
shorter one, and the model's text appears verbatim. Templates that rewrite earlier turns (e.g. drop the reasoning of
past assistant turns, or trim their whitespace) break it; `turn_suffix` then raises `ChatTemplateError` saying where
the two renderings part.
"""

from __future__ import annotations

from posttrain.envs.base import Message
from posttrain.models.loading import default_bos


class ChatTemplateError(ValueError):
    """The tokenizer's chat template is not append-only for this conversation (see the module docstring)."""


def render(tokenizer, messages: list[Message]) -> str:
    """The chat template's text for `messages` with the generation prompt (the next assistant header), starting
    with the BOS token when the tokenizer adds one by default (as `models.loading.format_prompt` does)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = default_bos(tokenizer)
    return bos + text if bos is not None and not text.startswith(bos) else text


def encode(tokenizer, text: str) -> list[int]:
    """`text`'s ids, no special tokens added (the template writes them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids: list[int]) -> str:
    """`ids` as text, special tokens kept and no space clean-up, so the template can write it back verbatim."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def turn_suffix(before: str, after: str, model_text: str, end_text: str) -> str:
    """The template text the environment adds after a model turn.

    Args:
        before: `render(history)`: the text the model continued (ends with the assistant header).
        after: `render(history + [assistant turn] + environment messages)`.
        model_text: the model's turn as the assistant message's content (its ids decoded, the end-of-turn token
            the model stopped on left out).
        end_text: the text of that end-of-turn token ("" when the model did not stop on one); the template usually
            writes the same text right after the content, and since the model produced it, it is not added again.
    Raises:
        ChatTemplateError: `after` does not start with `before` + `model_text`.
    """
    if not after.startswith(before):
        at = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), len(after))
        raise ChatTemplateError(
            f"the chat template is not append-only: rendering the conversation with the environment's new messages "
            f"changes the text before them at character {at} ({before[at - 20 : at + 20]!r} became "
            f"{after[at - 20 : at + 20]!r}); multi-turn episodes need a template that renders earlier turns the "
            "same way whatever follows (docs/environments.md#chat-templates)"
        )
    rest = after[len(before) :]
    if not rest.startswith(model_text):
        raise ChatTemplateError(
            f"the chat template does not write the model's turn verbatim: expected it to continue with "
            f"{model_text[:60]!r}, it wrote {rest[:60]!r} (a template that trims or rewrites assistant messages "
            "cannot be used for multi-turn episodes; docs/environments.md#chat-templates)"
        )
    suffix = rest[len(model_text) :]
    return suffix[len(end_text) :] if end_text and suffix.startswith(end_text) else suffix
