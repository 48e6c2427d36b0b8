"""Offline datasets: read and check SFT / preference rows, and tokenize them with the chat template.

Row formats (docs/offline.md#data):
- SFT: `prompt` + `completion`, or `messages` (a whole chat; the loss goes on the assistant turns);
- preference (dpo, orpo, reward_model): `prompt`, `chosen`, `rejected`.
Prompts and completions are strings or chat messages (`[{"role": ..., "content": ...}]`); a string prompt is one
user message and a string completion one assistant message.

Tokenization follows TRL 1.16 so that the cross-check tests compare the same tokens: with a chat template, the prompt
is rendered with the generation prompt and the whole conversation without it; the completion is the part of the
whole conversation after the longest common token prefix (so it ends with the template's end-of-turn tokens).
Without a template, the text is `format_prompt`'s plain text followed by the completion and the EOS token.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from posttrain.config import FileSource, HubSource, RecipeConfig
from posttrain.data.sources import DataError, read_json_rows
from posttrain.models.loading import chat_messages, default_bos, format_prompt

PREFERENCE_COLUMNS = ("chosen", "rejected")


@dataclass
class Sequence:
    """One tokenized training sequence: `input_ids` and a same-length 0/1 `loss_mask` (1 = supervised token).

    A packed row (`pack_sequences`) also has `position_ids`, restarting at 0 where each packed sequence starts.
    """

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int] | None = None


@dataclass
class PreferencePair:
    """The prompt + chosen and prompt + rejected sequences of one row, and its optional reward-model margin."""

    chosen: Sequence
    rejected: Sequence
    margin: float | None = None


# ------------------------------------------------------------------------------------------------ reading


def read_rows(cfg: RecipeConfig) -> tuple[str, list[dict[str, Any]]]:
    """(a name for error messages, the raw rows) of `cfg.data` (a file or a `datasets` dataset)."""
    src = cfg.data
    if isinstance(src, FileSource):
        rows = read_json_rows(src.path)
        name = src.path
    elif isinstance(src, HubSource):
        try:
            import datasets
        except ImportError:
            raise DataError(f"data.kind=hub ({src.name}) needs the `datasets` package: pip install datasets") from None
        split = f"{src.split}[:{src.limit}]" if src.limit else src.split
        rows, name = [dict(r) for r in datasets.load_dataset(src.name, src.subset, split=split)], src.name
    else:
        raise DataError(f"data.kind: {cfg.algorithm.name} needs a file or hub dataset, got {src.kind}")
    rows = rows[: src.limit] if src.limit else rows
    if not rows:
        raise DataError(f"{name}: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {i} is a {type(row).__name__}, expected an object with named columns")
    return name, rows


def _check_text_or_messages(value: Any, where: str, column: str) -> None:
    """A string, or a non-empty list of `{"role": str, "content": str}` messages; DataError naming `where`/column."""
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column `{column}` must be a string or a list of chat messages, got {value!r:.60}")
    for j, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: column `{column}`, message {j} must be {{'role': str, 'content': str}}, got {message!r:.60}"
            )


def _column(row: dict[str, Any], column: str, where: str, needed: str) -> Any:
    if column not in row:
        raise DataError(f"{where} has no `{column}` column ({needed}; it has {sorted(row)})")
    return row[column]


# ------------------------------------------------------------------------------------------------ tokenizing


class ChatTokenizer:
    """Prompt + completion -> token ids and the completion's position, the same way for every offline method."""

    def __init__(self, tokenizer, system_prompt: str | None, use_chat_template: bool, max_length: int):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.use_template = bool(use_chat_template and tokenizer.chat_template)
        self.max_length = max_length
        self.bos = default_bos(tokenizer)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if self.bos is not None and not text.startswith(self.bos):
            text = self.bos + text
        return self._ids(text)

    def prompt_completion(self, prompt: str | list[dict], completion: str | list[dict], where: str) -> Sequence:
        """prompt + completion tokens, with the loss mask on the completion's tokens."""
        if self.use_template:
            messages = chat_messages(prompt, self.system_prompt)
            answer = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            prompt_ids = self._render(messages, generation_prompt=True)
            full_ids = self._render(messages + list(answer), generation_prompt=False)
            start = _common_prefix(prompt_ids, full_ids)
        else:
            if not isinstance(completion, str):
                raise DataError(f"{where}: chat-message completions need a chat template (model.use_chat_template)")
            prompt_ids = self._ids(format_prompt(self.tokenizer, prompt, self.system_prompt, use_chat_template=False))
            full_ids = prompt_ids + self._ids(completion + (self.tokenizer.eos_token or ""))
            start = len(prompt_ids)
        if start == len(full_ids):
            raise DataError(f"{where}: the completion is empty after tokenization")
        return Sequence(full_ids, [0] * start + [1] * (len(full_ids) - start))

    def conversation(self, messages: list[dict], where: str, assistant_only: bool) -> Sequence:
        """A whole chat; the loss mask covers each assistant turn (as the template renders it), or every token."""
        if not self.use_template:
            raise DataError(
                f"{where}: `messages` rows need a chat template (model.use_chat_template and a tokenizer with one)"
            )
        messages = chat_messages(messages, self.system_prompt)
        full_ids = self._render(messages, generation_prompt=False)
        if not assistant_only:
            return Sequence(full_ids, [1] * len(full_ids))
        mask = [0] * len(full_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = _common_prefix(self._render(messages[:i], generation_prompt=True), full_ids)
            end_ids = self._render(messages[: i + 1], generation_prompt=False)
            if full_ids[: len(end_ids)] != end_ids:
                raise DataError(f"{where}: the chat template does not render turn {i} as a prefix of the conversation")
            mask[start : len(end_ids)] = [1] * (len(end_ids) - start)
        if not any(mask):
            raise DataError(f"{where}: column `messages` has no assistant turn to learn from")
        return Sequence(full_ids, mask)

    def truncate(self, seq: Sequence) -> Sequence | None:
        """Keep the first `max_length` tokens; None when no supervised token is left (the row is dropped)."""
        ids, mask = seq.input_ids[: self.max_length], seq.loss_mask[: self.max_length]
        return Sequence(ids, mask) if any(mask[1:]) else None  # token 0 is never predicted


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------------ datasets


def sft_sequences(cfg: RecipeConfig, tok: ChatTokenizer) -> list[Sequence]:
    """Tokenized SFT rows (`messages`, or the prompt column + `completion`), too-long rows truncated or dropped;
    packed into rows of `train.max_length` tokens with `sft.packing`."""
    name, rows = read_rows(cfg)
    prompt_column = cfg.data.prompt_column
    out, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"{name}: row {i}"
        if "messages" in row:
            _check_text_or_messages(row["messages"], where, "messages")
            if isinstance(row["messages"], str):
                raise DataError(f"{where}: column `messages` must be a list of chat messages, got a string")
            seq = tok.conversation(row["messages"], where, assistant_only=cfg.sft.completion_only)
        else:
            needed = f"SFT rows need `messages`, or `{prompt_column}` and `completion`"
            prompt = _column(row, prompt_column, where, needed)
            completion = _column(row, "completion", where, needed)
            _check_text_or_messages(prompt, where, prompt_column)
            _check_text_or_messages(completion, where, "completion")
            seq = tok.prompt_completion(prompt, completion, where)
            if not cfg.sft.completion_only:
                seq = Sequence(seq.input_ids, [1] * len(seq.input_ids))
        seq = tok.truncate(seq)
        dropped += seq is None
        if seq is not None:
            out.append(seq)
    out = _report_dropped(out, dropped, name, tok.max_length)
    return pack_sequences(out, tok.max_length) if cfg.sft.packing else out


def pack_sequences(sequences: list[Sequence], max_length: int) -> list[Sequence]:
    """Concatenate consecutive sequences into rows of at most `max_length` tokens (in order, a new row whenever the
    next one does not fit). Positions restart at 0 for each sequence, and its first token carries no loss (it is
    never predicted: the token before it belongs to another sequence), exactly as when the sequence is alone."""
    packs: list[Sequence] = []
    for seq in sequences:
        n = len(seq.input_ids)
        if packs and len(packs[-1].input_ids) + n <= max_length:
            row = packs[-1]
            row.input_ids += seq.input_ids
            row.loss_mask += [0] + seq.loss_mask[1:]
            row.position_ids += list(range(n))
        else:
            packs.append(Sequence(list(seq.input_ids), [0] + seq.loss_mask[1:], list(range(n))))
    return packs


def preference_pairs(cfg: RecipeConfig, tok: ChatTokenizer) -> list[PreferencePair]:
    """Tokenized preference rows (the prompt column, `chosen`, `rejected`, and the optional margin column)."""
    name, rows = read_rows(cfg)
    prompt_column = cfg.data.prompt_column
    margin_column = cfg.reward_model.margin_column if cfg.algorithm.spec.learner_loss == "reward_model" else None
    needed = f"preference rows need `{prompt_column}`, `chosen` and `rejected`"
    out, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"{name}: row {i}"
        prompt = _column(row, prompt_column, where, needed)
        _check_text_or_messages(prompt, where, prompt_column)
        seqs = []
        for column in PREFERENCE_COLUMNS:
            completion = _column(row, column, where, needed)
            _check_text_or_messages(completion, where, column)
            seqs.append(tok.truncate(tok.prompt_completion(prompt, completion, where)))
        margin = None
        if margin_column is not None:
            margin = _column(row, margin_column, where, "set by reward_model.margin_column")
            if isinstance(margin, bool) or not isinstance(margin, int | float):
                raise DataError(f"{where}: column `{margin_column}` (the margin) must be a number, got {margin!r}")
            margin = float(margin)
        if None in seqs:
            dropped += 1
            continue
        out.append(PreferencePair(seqs[0], seqs[1], margin))
    return _report_dropped(out, dropped, name, tok.max_length)


def _report_dropped(items: list, dropped: int, name: str, max_length: int) -> list:
    if dropped:
        print(f"{name}: dropped {dropped} rows whose prompt fills train.max_length={max_length}", file=sys.stderr)
    if not items:
        raise DataError(f"{name}: no usable rows (every prompt fills train.max_length={max_length})")
    return items
