"""The teacher of on-policy distillation: a frozen model in its own Ray actor that grades the student's tokens.

GKD (2306.13649) and the Qwen3 report: the student samples, the teacher scores the same token ids. The actor loads
the teacher once (on a GPU when the machine has one, else the CPU) and answers two batched questions about a
`TrainBatch` (prompt | completion, the student's token ids):
  - `logprobs`: the teacher's log-prob of each completion token, [B, C] float32 (for `opd.loss: reverse_kl`);
  - `logits`: its full next-token logits at the completion positions, [B, C, V] (for `opd.loss: jsd`).
Memory, stated: `logits` is B * C * V numbers (Qwen's 152k vocabulary: ~0.3 MB per token in bf16), so the learner
asks for one micro-batch at a time (`train.micro_batch_size` rows, each trimmed to its own longest completion),
and the logits travel in the teacher's dtype; the whole rollout batch's logits are never held at once (the price:
with several updates per rollout batch they are fetched again for each update). Log-probs use the sampling
temperature, like the student's (docs/algorithms.md#notation).

Teacher and student must share a tokenizer: `check_same_tokenizer` compares them before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from posttrain.learner.batch import TrainBatch
from posttrain.models.loading import load_model, load_tokenizer, set_matmul_precision
from posttrain.models.logprobs import completion_logits, token_logprobs

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_same_tokenizer(student: str, teacher: str) -> None:
    """Raise ValueError naming both models unless their tokenizers map every token to the same id and agree on the
    special tokens (bos, eos, pad, unk; `load_tokenizer` pads with eos when a model has no pad token)."""
    s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    problems = []
    if s_vocab != t_vocab:
        differ = sorted(k for k in s_vocab.keys() | t_vocab.keys() if s_vocab.get(k) != t_vocab.get(k))
        problems.append(
            f"vocabularies differ ({len(s_vocab)} vs {len(t_vocab)} tokens; {len(differ)} tokens differ, e.g. "
            f"{', '.join(repr(k) for k in differ[:3])})"
        )
    for name in SPECIAL_TOKENS:
        if getattr(s_tok, name) != getattr(t_tok, name):
            problems.append(f"{name} {getattr(s_tok, name)} vs {getattr(t_tok, name)}")
    if problems:
        raise ValueError(
            f"opd.teacher: the student {student!r} and the teacher {teacher!r} do not share a tokenizer: "
            f"{'; '.join(problems)}. On-policy distillation grades the student's token ids with the teacher, so both "
            "need the same tokenizer (e.g. one model family)"
        )


@dataclass
class TeacherSettings:
    model_path: str
    dtype: str = "float32"
    temperature: float = 1.0
    """log-probs and logits are of softmax(logits / temperature), as the student's"""
    batch_size: int = 8
    """sequences per forward pass"""
    device: str = "auto"
    """"auto" = cuda when available, else cpu"""
    num_threads: int | None = None
    matmul_precision: str = "highest"
    """this process's float32 matmul precision (`models.loading.set_matmul_precision`)"""


class TeacherImpl:
    """A frozen causal LM that scores given token ids. Methods are the actor's RPC surface; see `Teacher`."""

    def __init__(self, settings: TeacherSettings):
        self.settings = s = settings
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device)
        if self.device.type == "cpu":
            torch.set_num_threads(s.num_threads or os.cpu_count() or 1)  # Ray actors start with one thread
        set_matmul_precision(s.matmul_precision, "TeacherSettings.matmul_precision")
        self.model = load_model(s.model_path, dtype=s.dtype).to(self.device).eval().requires_grad_(False)
        self.vocab_size = len(load_tokenizer(s.model_path))

    def ready(self) -> bool:
        return True

    @torch.inference_mode()
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, C] float32 (CPU): the teacher's log-prob of each completion token of `batch`; 0 on padding."""
        out_BC = torch.zeros_like(batch.loss_mask_BC)
        for lo in range(0, len(batch), self.settings.batch_size):
            mb = batch.slice(lo, lo + self.settings.batch_size)
            lp, _ = token_logprobs(
                self.model,
                mb.input_ids_BT.to(self.device),
                mb.attention_mask_BT.to(self.device),
                self.settings.temperature,
                with_entropy=False,
                completion_start=mb.prompt_width,
            )
            out_BC[lo : lo + len(mb), : lp.shape[1]] = lp.cpu()
        return out_BC

    @torch.inference_mode()
    def logits(self, batch: TrainBatch) -> torch.Tensor:
        """[B, C, V] untempered logits (CPU, the teacher's dtype) predicting each completion column of `batch` (as
        given: call it with one micro-batch); V = the tokenizer's vocabulary (padded rows of the embedding dropped)."""
        logits_BCV = completion_logits(
            self.model,
            batch.input_ids_BT.to(self.device),
            batch.attention_mask_BT.to(self.device),
            batch.prompt_width,
        )
        return logits_BCV[..., : self.vocab_size].to(self.model.dtype).cpu()
