"""The learner: policy (+ LoRA), optimizer, LR schedule; `train_step` turns one rollout batch into updates.

Runs as a Ray actor (`Learner`) or in-process (`LearnerImpl`). Four losses, named by `LearnerSettings.loss`:
  - `"policy"`: the clipped surrogate (GRPO, DeepSeekMath 2402.03300 eq. 3; RLOO and REINFORCE++ use it too, where
    with one update per batch it is exactly REINFORCE), per token or with GSPO's sequence ratio, plus an optional
    KL to the reference (estimator k1/k2/k3) in the loss, reduced as the config says;
  - `"sft"`: token-mean NLL of the batch's completions (online RFT's step on the kept samples);
  - `"opd_reverse_kl"` (on-policy distillation): the same clipped surrogate with a per-token advantage
    `lp_teacher - lp_old` (+ `reward_coef` times the batch's sequence advantages),
    `algorithms.losses.distill.opd_advantages`;
  - `"opd_jsd"`: the generalised JSD to the teacher over the whole vocabulary at every completion position, with
    gradient through the student's full logits; the teacher's logits come from the teacher actor one micro-batch
    at a time (memory: see `learner/teacher.py`); plus the policy term on `reward_coef` x sequence advantages if > 0.
With LoRA the reference is the same model with the adapter disabled, so no second copy of the weights is held.

Several updates per rollout batch: the batch is split into `mini_batches` contiguous row ranges, one optimizer
step each, and the whole pass repeats `epochs_per_batch` times. `lp_old` is then the learner's log-prob before
the first update, computed once per rollout batch (one no-grad pass, eval mode) unless the batch brings it (the
driver computed it to put the KL in the reward). Deviation, stated: with a single update per batch no extra pass
is made and `lp_old` is the learner's own log-prob detached (ratio == 1). The sampler's log-probs are logged against
the learner's (`rollout/logprob_diff`, a weight-sync check) and, with `tis_cap` set, weight each token's policy term
by `min(exp(lp_old - lp_sampler), tis_cap)` (truncated importance sampling, `algorithms/losses/tis.py`).

Cost, stated: when a KL is used (in the loss, or in the reward: `reference`), the reference's log-probs are computed
once per rollout batch (one extra no-grad forward). Without a KL no reference pass is made, even with LoRA (where the
reference would be the adapter switched off), and `kl` is not logged (NaN).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from posttrain.algorithms.kl import kl_estimate
from posttrain.algorithms.losses.distill import generalized_jsd_per_token, opd_advantages
from posttrain.algorithms.losses.policy import clipped_policy_loss, gspo_policy_loss
from posttrain.algorithms.losses.sft import sft_nll
from posttrain.algorithms.losses.tis import tis_weights
from posttrain.algorithms.masked import masked_mean
from posttrain.algorithms.reduction import reduce_loss
from posttrain.learner.batch import TrainBatch, batch_to, micro_batches, select_rows
from posttrain.models.loading import load_model, load_tokenizer, set_matmul_precision
from posttrain.models.logprobs import autocast_body, completion_logits, logprobs_from_logits, token_logprobs
from posttrain.models.lora import apply_lora, full_precision_copy, merged_state_dict, save_merged
from posttrain.models.lora_adapter import LoraAdapter, lora_adapter
from posttrain.models.training import (
    OptimizerSettings,
    Stats,
    make_optimizer,
    mini_batch_bounds,
    restore_training_state,
    rng_state,
)
from posttrain.rollout.weight_sender import WeightSender


@dataclass
class LearnerSettings(OptimizerSettings):
    """What the policy learner needs from the recipe: `OptimizerSettings` and the policy loss."""

    temperature: float = 1.0
    loss: str = "policy"
    """"policy" (clipped surrogate), "sft" (NLL on the batch's completions), "opd_reverse_kl" or "opd_jsd" (on-policy
    distillation; see the module docstring)"""
    opd_beta: float = 0.5
    """opd_jsd: the generalised JSD's beta (0 = forward KL, 1 = reverse KL)"""
    reward_coef: float = 0.0
    """opd losses: weight of the batch's sequence advantages (verifiable rewards) next to the teacher's signal"""
    tis_cap: float | None = None
    """truncated importance sampling: policy terms weighted by min(exp(lp_old - lp_sampler), tis_cap); None = off"""
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_level: str = "token"
    """"token" (PPO/GRPO) or "sequence" (GSPO)"""
    kl_coef: float = 0.0
    """weight of the KL in the loss (0 when the KL is in the reward or off)"""
    kl_estimator: str = "k3"
    reference: bool = False
    """compute reference log-probs even when `kl_coef` is 0 (the driver puts the KL in the reward)"""
    loss_reduction: str = "token-mean"
    autocast: str = "none"
    """"bf16": the model's forward/backward under bf16 autocast; the LM head and log-probs stay float32"""
    micro_batch_tokens: int | None = None
    """update passes: rows sorted by length into micro-batches of at most this many padded tokens (and at most
    `micro_batch_size` rows), `learner.batch.micro_batches`; None = contiguous micro-batches of `micro_batch_size`"""
    device: str = "auto"
    """"auto" = cuda when this process sees a GPU (a Ray actor sees one only if given `num_gpus`), else cpu"""
    empty_cuda_cache: bool = False
    """after each train_step, give torch's cached CUDA memory back to the device: engines that slept on the same GPU
    during training (rollout.sleep_level) need that memory when they wake"""


LOSSES = ("policy", "sft", "opd_reverse_kl", "opd_jsd")
MAIN_LOSS_NAMES = {"policy": "pg_loss", "sft": "sft_loss", "opd_reverse_kl": "pg_loss", "opd_jsd": "jsd_loss"}


class LearnerImpl(WeightSender):
    """Holds the policy and optimizer. Methods are the actor's RPC surface; see `Learner`."""

    def __init__(self, settings: LearnerSettings, teacher=None):
        """`teacher`: the `Teacher` actor or an in-process `TeacherImpl`, which `opd_jsd` asks for logits."""
        self.settings = s = settings
        if s.loss not in LOSSES:
            raise ValueError(f"LearnerSettings.loss: unknown {s.loss!r}; allowed: {', '.join(LOSSES)}")
        if s.autocast not in ("none", "bf16"):
            raise ValueError(f"LearnerSettings.autocast: unknown {s.autocast!r}; allowed: none, bf16")
        if s.loss == "opd_jsd" and teacher is None:
            raise ValueError("LearnerSettings.loss: opd_jsd needs the teacher (LearnerImpl(settings, teacher=...))")
        self.teacher = teacher
        torch.set_num_threads(s.num_threads or os.cpu_count() or 1)
        set_matmul_precision(s.matmul_precision, "LearnerSettings.matmul_precision")  # the reference's too
        torch.manual_seed(s.seed)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device)
        self.tokenizer = load_tokenizer(s.model_path, padding_side="right")
        if s.quantize != "none" and not s.lora:
            raise ValueError("LearnerSettings.quantize: a 4-bit base (QLoRA) needs lora (model.lora)")
        model = load_model(s.model_path, dtype=s.dtype, quantize=s.quantize).to(self.device)
        self.model = apply_lora(model, s.lora) if s.lora else model
        self.model.train()
        # With full weights and a KL term, the reference is a frozen copy; with LoRA it is the adapter switched off.
        self.ref_model = None
        if (s.kl_coef > 0 or s.reference) and not s.lora:
            self.ref_model = load_model(s.model_path, dtype=s.dtype).to(self.device).eval().requires_grad_(False)
        self.optimizer, self.scheduler = make_optimizer([p for p in self.model.parameters() if p.requires_grad], s)
        self.steps_done = 0

    # ------------------------------------------------------------------------------------------- training

    def ready(self) -> bool:
        return True

    @property
    def has_reference(self) -> bool:
        """Whether reference log-probs are computed: only when something uses them (a KL in the loss, or in the
        reward: `reference`). With LoRA the reference costs nothing to hold, but a forward pass per rollout batch
        (a third of a step's compute with kl_coef 0), so without a KL there is none and `kl` is not logged (NaN)."""
        s = self.settings
        return self.ref_model is not None or (s.lora is not None and (s.kl_coef > 0 or s.reference))

    def _forward(self, mb: TrainBatch, reference: bool, with_grad: bool):
        """(log-probs [B, C], entropy [B, C] or None) of the micro-batch's completion tokens."""
        s = self.settings
        ctx, model = contextlib.nullcontext(), self.model
        if reference and self.ref_model is not None:
            model = self.ref_model
        elif reference:  # LoRA: the base model is the reference, so switch the adapter off for this pass
            ctx = self.model.disable_adapter()
        autocast = torch.bfloat16 if s.autocast == "bf16" else None
        with (
            ctx,
            contextlib.nullcontext() if with_grad else torch.no_grad(),
            autocast_body(model, self.device.type, autocast),
        ):
            return token_logprobs(
                model, mb.input_ids_BT, mb.attention_mask_BT, s.temperature, with_grad, mb.prompt_width
            )

    def logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """No-grad log-probs of the batch's completion tokens, [B, C]: (policy, reference or None).

        The policy's are `lp_old` for the coming updates (taken in eval mode, so no dropout). Returned on the CPU.
        """
        batch = batch_to(batch, self.device)
        policy_BC = torch.zeros_like(batch.loss_mask_BC)
        ref_BC = torch.zeros_like(batch.loss_mask_BC) if self.has_reference else None
        self.model.eval()
        try:
            for lo in range(0, len(batch), self.settings.micro_batch_size):
                mb = batch.slice(lo, lo + self.settings.micro_batch_size)
                rows, c = slice(lo, lo + len(mb)), mb.loss_mask_BC.shape[1]
                policy_BC[rows, :c] = self._forward(mb, reference=False, with_grad=False)[0]
                if ref_BC is not None:
                    ref_BC[rows, :c] = self._forward(mb, reference=True, with_grad=False)[0]
        finally:
            self.model.train()
        return policy_BC.cpu(), None if ref_BC is None else ref_BC.cpu()

    def train_step(self, batch: TrainBatch, mini_bounds: list[int] | None = None) -> dict[str, float]:
        """`epochs_per_batch` x `mini_batches` optimizer steps over one rollout batch; returns detached metrics.

        `mini_bounds`: the row bounds of the mini-batches, `[0, ..., len(batch)]` (a data-parallel rank gets its share
        of each global mini-batch from the driver, possibly empty); default: `mini_batches` near-equal row ranges.
        """
        s = self.settings
        start = time.perf_counter()
        if self._all_sum(float(batch.loss_mask_BC.sum()))[0] == 0:
            raise ValueError("train_step: the batch has no completion tokens with loss (all samples skipped?)")
        several_updates = s.epochs_per_batch * s.mini_batches > 1
        need_old = s.loss != "sft" and several_updates and batch.old_logprobs_BC is None
        need_ref = self.has_reference and batch.ref_logprobs_BC is None
        if need_old or need_ref:
            old_BC, ref_BC = self.logprobs(batch)  # before the first update: lp_old, once per rollout batch
            batch = replace(
                batch,
                old_logprobs_BC=old_BC if need_old else batch.old_logprobs_BC,
                ref_logprobs_BC=ref_BC if need_ref else batch.ref_logprobs_BC,
            )
        batch = batch_to(batch, self.device)
        stats = Stats()
        first_lr = self.scheduler.get_last_lr()[0]
        if mini_bounds is None:
            mini_bounds = mini_batch_bounds(len(batch), s.mini_batches)
        updates = 0
        for _ in range(s.epochs_per_batch):
            for lo, hi in zip(mini_bounds[:-1], mini_bounds[1:], strict=True):
                lo, hi = int(lo), int(hi)
                if (lo, hi) == (0, len(batch)):
                    mini = batch
                else:  # a rank's share of a global mini-batch may have no rows; it still joins the step
                    mini = batch.slice(lo, hi) if hi > lo else select_rows(batch, [])
                updates += self._update(mini, stats)
        metrics = self._reduce_stats(stats).result(max(updates, 1))
        metrics.update(lr=first_lr, updates=float(updates))
        metrics.setdefault("kl", float("nan"))
        metrics["time/train_step"] = time.perf_counter() - start
        if s.empty_cuda_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return metrics

    def _update(self, batch: TrainBatch, stats: Stats) -> int:
        """One optimizer step over `batch`, in micro-batches; returns 1, or 0 if it has no loss tokens."""
        s = self.settings
        # normalisers of the whole optimizer step (on all data-parallel ranks), so micro-batch losses sum to the
        # full-batch value; sequences without loss tokens (skipped samples) do not count
        num_tokens, num_seqs = self._all_sum(
            float(batch.loss_mask_BC.sum()), float((batch.loss_mask_BC.sum(-1) > 0).sum())
        )
        if num_tokens == 0:
            return 0
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        norm = dict(num_tokens=num_tokens, num_seqs=int(num_seqs), max_completion_tokens=batch.max_completion_tokens)
        for mb in micro_batches(batch, s.micro_batch_size, s.micro_batch_tokens):
            if float(mb.loss_mask_BC.sum()) > 0:
                self._micro_batch_backward(mb, norm, stats)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._all_reduce_grads(params)  # data-parallel: the shares' gradients add up to the whole step's
        stats.add("grad_norm", float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)))
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        return 1

    def _micro_batch_backward(self, mb: TrainBatch, norm: dict, stats: Stats) -> None:
        """Loss of one micro-batch (its share of the step's loss), backward, and its metrics into `stats`."""
        s = self.settings
        mask = mb.loss_mask_BC
        weight = float(mask.sum())
        if s.loss == "opd_jsd":
            lp, entropy, main = self._jsd_loss(mb, norm, stats)
        else:
            lp, entropy = self._forward(mb, reference=False, with_grad=True)  # [B, C]: completion tokens only
            if s.loss == "sft":
                main, sft_metrics = sft_nll(lp, mask, norm["num_tokens"])
                stats.mean("nll", sft_metrics["nll"], weight)
            else:
                main = self._policy_loss(mb, lp, norm, stats)
        loss = main
        if mb.ref_logprobs_BC is not None:
            kl_BC = kl_estimate(s.kl_estimator, lp, mb.ref_logprobs_BC)
            if s.kl_coef > 0:
                reduction = "token-mean" if s.loss == "sft" else s.loss_reduction
                loss = loss + s.kl_coef * reduce_loss(kl_BC, mask, reduction, **norm)
            stats.mean("kl", float(masked_mean(kl_BC.detach(), mask)), weight)
        loss.backward()
        stats.add("loss", float(loss.detach()))
        stats.add(MAIN_LOSS_NAMES[s.loss], float(main.detach()))
        stats.mean("entropy", float(masked_mean(entropy, mask)), weight)
        lp_diff = (lp.detach() - mb.sampler_logprobs_BC).abs()
        stats.mean("rollout/logprob_diff", float(masked_mean(lp_diff, mask)), weight)

    def _policy_loss(self, mb: TrainBatch, lp: torch.Tensor, norm: dict, stats: Stats) -> torch.Tensor:
        """The reduced clipped surrogate of one micro-batch; its advantages as `settings.loss` says."""
        s, mask = self.settings, mb.loss_mask_BC
        weight = float(mask.sum())
        old = lp.detach() if mb.old_logprobs_BC is None else mb.old_logprobs_BC
        advantages = mb.advantages
        if s.loss == "opd_reverse_kl":  # the teacher grades each token against lp_old (sampled reverse KL)
            advantages = opd_advantages(mb.teacher_logprobs_BC, old, mask, mb.advantages_B, s.reward_coef)
            stats.mean("opd/reverse_kl", float(masked_mean(old - mb.teacher_logprobs_BC, mask)), weight)
        elif s.loss == "opd_jsd":  # the JSD is the distillation term; only the rewards go through the policy loss
            advantages = s.reward_coef * mb.advantages_B
        policy_loss = gspo_policy_loss if s.ratio_level == "sequence" else clipped_policy_loss
        per_token, pg = policy_loss(lp, old, advantages, mask, s.eps_low, s.eps_high, s.dual_clip)
        if s.tis_cap is not None:  # the engine (or async mode's one-step-old weights) sampled, not lp_old's policy
            tis_BC, tis = tis_weights(old, mb.sampler_logprobs_BC, mask, s.tis_cap)
            per_token = per_token * tis_BC
            for name, value in tis.items():
                stats.mean(name, value, weight)
        for name in ("clip_fraction", "dual_clip_fraction"):
            if name in pg:
                stats.mean(name, pg[name], weight)
        stats.extremes("ratio", pg["ratio/min"], pg["ratio/max"])
        return reduce_loss(per_token, mask, s.loss_reduction, **norm)

    def _jsd_loss(self, mb: TrainBatch, norm: dict, stats: Stats):
        """(lp [B, C], entropy [B, C], reduced loss) of one micro-batch under `opd_jsd`: the generalised JSD between
        the student's and the teacher's full next-token distributions at each completion position (one student
        forward with gradient; the teacher's logits fetched for this micro-batch only)."""
        s, mask = self.settings, mb.loss_mask_BC
        weight = float(mask.sum())
        teacher_BCV = self._teacher_logits(mb).float().to(self.device)
        P = mb.prompt_width
        logits_BCV = completion_logits(self.model, mb.input_ids_BT, mb.attention_mask_BT, P)  # with gradient
        targets_BC, valid_BC = mb.input_ids_BT[:, P:], mb.attention_mask_BT[:, P:]
        lp, entropy = logprobs_from_logits(logits_BCV, targets_BC, valid_BC, s.temperature)
        vocab = teacher_BCV.shape[-1]  # the shared tokenizer's; a model's embedding may have padded rows beyond it
        if logits_BCV.shape[-1] < vocab:
            raise ValueError(
                f"opd_jsd: the student has {logits_BCV.shape[-1]} logits; the teacher's vocabulary {vocab}"
            )
        jsd_BC = generalized_jsd_per_token(logits_BCV[..., :vocab], teacher_BCV, mask, s.opd_beta, s.temperature)
        main = reduce_loss(jsd_BC, mask, s.loss_reduction, **norm)
        teacher_lp, _ = logprobs_from_logits(teacher_BCV, targets_BC, valid_BC, s.temperature)
        stats.mean("jsd", float(masked_mean(jsd_BC.detach(), mask)), weight)
        stats.mean("opd/reverse_kl", float(masked_mean(lp.detach() - teacher_lp, mask)), weight)
        if s.reward_coef > 0:
            main = main + self._policy_loss(mb, lp, norm, stats)
        return lp, entropy, main

    def _teacher_logits(self, mb: TrainBatch) -> torch.Tensor:
        """The teacher's logits of one micro-batch: from the Teacher actor, or from an in-process `TeacherImpl`."""
        if not hasattr(self.teacher.logits, "remote"):
            return self.teacher.logits(mb)
        # A Ray actor handle (its methods have `.remote`): ray is imported here, on the actor path only, so that this
        # module imports where ray is not installed (`tests/test_layering.py`).
        import ray

        return ray.get(self.teacher.logits.remote(batch_to(mb, "cpu")))

    # ------------------------------------------------------------------------------------------- data parallel
    # One learner: identities. `learner/data_parallel.py`'s ranks override them with collectives over their group.

    def _all_sum(self, *values: float) -> tuple[float, ...]:
        """`values` summed over the data-parallel ranks."""
        return values

    def _all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over the data-parallel ranks (each rank's loss is its share of the step's loss)."""

    def _reduce_stats(self, stats: Stats) -> Stats:
        """The running metrics of all data-parallel ranks as one."""
        return stats

    # ------------------------------------------------------------------------------------------- weights

    def get_weights(self, only_changed: bool = True) -> dict[str, torch.Tensor]:
        """Plain-model weights for the rollout engines (LoRA merged; with `only_changed`, just the adapted ones)."""
        return merged_state_dict(self.model, only_lora_targets=only_changed)

    def get_lora_adapter(self) -> LoraAdapter:
        """The LoRA adapter alone, for engines that apply it themselves (rollout.lora_sync: adapter)."""
        return lora_adapter(self.model)

    def save_final(self, out_dir: str) -> str:
        """A plain HF folder (LoRA merged) loadable by `AutoModelForCausalLM.from_pretrained` and by vLLM; QLoRA: the
        adapter merged into the checkpoint's full-precision base (`models.lora.full_precision_copy`)."""
        model = self.model
        if self.settings.quantize != "none":
            model = full_precision_copy(model, load_model(self.settings.model_path, dtype=self.settings.dtype))
        return str(save_merged(model, self.tokenizer, out_dir))

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, out_dir: str) -> None:
        """Everything needed to continue exactly: trainable weights, optimizer, scheduler, RNG states."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        trainable, optimizer = self._training_state()
        state = {
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
            "rng": rng_state(),
        }
        torch.save(state, out / "learner.pt.tmp")
        os.replace(out / "learner.pt.tmp", out / "learner.pt")

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Restore from `save_checkpoint`'s folder; returns the number of optimizer steps done."""
        state = self._read_checkpoint(ckpt_dir)
        restore_training_state(state, self.model, self.optimizer, self.scheduler, ckpt_dir)
        self.steps_done = state["steps_done"]
        return self.steps_done

    def _training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable tensors by name on the CPU, optimizer state dict) for a checkpoint (`learner/fsdp.py` gathers
        them)."""
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        return trainable, self.optimizer.state_dict()

    @staticmethod
    def _read_checkpoint(ckpt_dir: str) -> dict:
        return torch.load(Path(ckpt_dir) / "learner.pt", weights_only=False, map_location="cpu")
