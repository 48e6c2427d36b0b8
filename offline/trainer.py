"""The offline trainer: SFT, DPO, ORPO and reward-model training on a dataset, in this process (no Ray, no rollouts).

One loop for every method: each optimizer step takes `train.batch_size` rows in the resumable order of
`data.sources.batch_indices` (a fresh seeded shuffle per epoch), splits them into micro-batches of
`train.micro_batch_size`, accumulates gradients, clips by global norm and steps AdamW with the learner's LR schedule
(`models.training.lr_lambda`: the same optimizer, schedule and clipping conventions as online training). The run folder
is the one GRPO leaves: config.yaml, metrics.jsonl, TensorBoard, checkpoints/step-N, final/, curves.png.

The methods' math is in `algorithms/losses/` and the batching in `offline/objectives.py`. Reference model for DPO:
with LoRA, the policy with the adapter switched off; with full weights, a frozen copy, or none at all with
`preference.precompute_reference` (its log-probs are computed by the untrained policy before step 1, saved in the
run folder, and reused on resume).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from posttrain.config import ConfigError, RecipeConfig
from posttrain.data.sources import batch_indices
from posttrain.models.loading import (
    keep_4bit_layout,
    load_model,
    load_tokenizer,
    quantization_kwargs,
    resolve_model_path,
    set_matmul_precision,
    torch_dtype,
)
from posttrain.models.lora import LoraSettings, apply_lora, save_merged
from posttrain.models.lora import full_precision_copy as lora_full_precision_copy
from posttrain.models.training import lr_lambda, restore_training_state, rng_state
from posttrain.offline import objectives as obj
from posttrain.offline.data import ChatTokenizer, preference_pairs, sft_sequences
from posttrain.run_folder.report import plot_curves, summary_table
from posttrain.run_folder.run_dir import (
    RunLogger,
    checkpoint_staging,
    commit_checkpoint,
    failure_marker,
    open_run_dir,
    read_metrics,
)

REFERENCE_FILE = "reference_logps.pt"
"""precomputed reference log-probs of every pair, in the run folder (DPO with `precompute_reference`)"""

CURVES = {
    "sft": [("loss", "loss"), ("nll", "NLL"), ("grad_norm", "grad norm"), ("lr", "learning rate")],
    "dpo": [
        ("loss", "loss"),
        ("rewards/accuracy", "preference accuracy"),
        ("rewards/margin", "margin"),
        ("logps/chosen", "log p(chosen)"),
    ],
    "orpo": [
        ("loss", "loss"),
        ("accuracy", "preference accuracy"),
        ("nll", "chosen NLL"),
        ("log_odds_ratio", "log odds ratio"),
    ],
    "reward_model": [
        ("loss", "loss"),
        ("accuracy", "accuracy"),
        ("margin", "score margin"),
        ("grad_norm", "grad norm"),
    ],
}


def load_policy(cfg: RecipeConfig, model_path: str, tokenizer):
    """The trainable model: a causal LM (or, for reward_model, a 1-label sequence classifier) with optional LoRA."""
    if cfg.algorithm.spec.learner_loss == "reward_model":  # a score head, not an LM head
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(cfg.seed)  # the new score head's initialisation
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=1,
            dtype=torch_dtype(cfg.model.dtype),
            **quantization_kwargs(cfg.model.quantize, cfg.model.dtype),
        )
        if model.config.pad_token_id is None:  # transformers finds the last real token through the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        keep_4bit_layout(model)
    else:
        model = load_model(model_path, dtype=cfg.model.dtype, quantize=cfg.model.quantize)
    lora = cfg.model.lora
    if lora is not None:
        model = apply_lora(model, LoraSettings(lora.rank, lora.alpha, lora.dropout, list(lora.target_modules)))
    return model


def full_precision_copy(cfg: RecipeConfig, model_path: str, qlora_model, tokenizer):
    """The QLoRA adapter on a fresh full-precision base, for saving a plain merged folder (the deviation this makes,
    stated: `models.lora.full_precision_copy`)."""
    plain_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantize": "none", "lora": None})})
    return lora_full_precision_copy(qlora_model, load_policy(plain_cfg, model_path, tokenizer))


class OfflineTrainer:
    """Owns one offline run: its folder, model, optimizer and step loop. `run()` trains and returns the folder."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.method = cfg.algorithm.spec.learner_loss  # the objective: sft, dpo, orpo or reward_model
        torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
        set_matmul_precision(cfg.model.matmul_precision, "model.matmul_precision")
        self.model_path = model_path = resolve_model_path(cfg.model.path, "model.path")
        self.tokenizer = load_tokenizer(model_path, padding_side="right")
        self.pad_id = self.tokenizer.pad_token_id
        chat = ChatTokenizer(self.tokenizer, cfg.model.system_prompt, cfg.model.use_chat_template, cfg.train.max_length)
        self.rows = sft_sequences(cfg, chat) if self.method == "sft" else preference_pairs(cfg, chat)
        t = cfg.train
        self.total_steps = math.ceil(t.epochs * len(self.rows) / t.batch_size) if t.epochs else t.steps
        if t.warmup_steps > self.total_steps:
            raise ConfigError(
                f"train.warmup_steps ({t.warmup_steps}) must be <= the run's {self.total_steps} steps "
                f"(train.epochs={t.epochs} of {len(self.rows)} rows, {t.batch_size} per step)"
            )
        self.run_dir, self.start_step, resume_ckpt = open_run_dir(cfg, needs=("trainer.pt",))
        self.step = self.start_step  # the step in progress
        torch.manual_seed(cfg.seed)
        self.model = load_policy(cfg, model_path, self.tokenizer)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: lr_lambda(i, t.warmup_steps, self.total_steps, t.lr_schedule)
        )
        self.ref_model, self.ref_logps = None, None
        if self.method == "dpo":
            self._prepare_reference(model_path)
            self.dpo_loss = obj.dpo_loss_fn(
                obj.DPOSettings(cfg.preference.beta, cfg.preference.loss_type, cfg.preference.label_smoothing)
            )
        if resume_ckpt is not None:
            self.load_checkpoint(resume_ckpt)
        keep_until = (self.start_step if resume_ckpt else -1) if cfg.resume else None
        self.logger = RunLogger(self.run_dir, resume_after_step=keep_until)

    # ------------------------------------------------------------------------------------------------ reference

    def _prepare_reference(self, model_path: str) -> None:
        cfg = self.cfg
        if cfg.preference.precompute_reference:
            path = self.run_dir / REFERENCE_FILE
            if path.exists():  # a resumed run: the policy is no longer the reference
                self.ref_logps = torch.load(path)
            else:
                self.ref_logps = self._precompute_reference()
                torch.save(self.ref_logps, path)
        elif cfg.model.lora is None:
            self.ref_model = load_model(model_path, dtype=cfg.model.dtype).eval().requires_grad_(False)

    def _precompute_reference(self) -> torch.Tensor:
        """[rows, 2] reference (chosen, rejected) log-probs, computed by the untrained policy (== the reference)."""
        self.model.eval()  # no dropout in the reference pass
        out = []
        size = self.cfg.train.micro_batch_size
        for lo in range(0, len(self.rows), size):
            with torch.no_grad():
                batch = obj.pair_batch(self.rows[lo : lo + size], self.pad_id)
                chosen_B, rejected_B = obj.pair_sequence_logprobs(self.model, batch)
            out.append(torch.stack([chosen_B, rejected_B], dim=-1))
        self.model.train()
        return torch.cat(out)

    def _reference_of(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_logps is not None:
            ref_B2 = self.ref_logps[indices]
            return ref_B2[:, 0], ref_B2[:, 1]
        return obj.reference_logprobs(self.model, self.ref_model, [self.rows[i] for i in indices], self.pad_id)

    # ------------------------------------------------------------------------------------------------ steps

    def _micro_loss(self, indices: list[int], step_rows: int, step_tokens: float):
        rows = [self.rows[i] for i in indices]
        if self.method == "sft":
            return obj.sft_micro_loss(self.model, rows, self.pad_id, step_tokens)
        if self.method == "dpo":
            ref = self._reference_of(indices)
            return obj.dpo_micro_loss(self.model, rows, ref, self.dpo_loss, self.pad_id, step_rows)
        if self.method == "orpo":
            return obj.orpo_micro_loss(self.model, rows, self.cfg.preference.orpo_lambda, self.pad_id, step_rows)
        center = self.cfg.reward_model.center_coef
        return obj.reward_model_micro_loss(self.model, rows, center, self.pad_id, step_rows)

    def train_step(self, indices: list[int]) -> dict[str, float]:
        """One optimizer step over the rows `indices`, in micro-batches; returns detached metrics."""
        t = self.cfg.train
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        step_tokens = 0.0
        if self.method == "sft":  # every supervised token of the step but column 0 (never predicted)
            step_tokens = float(sum(sum(self.rows[i].loss_mask[1:]) for i in indices))
        total_loss, weighted, total_weight = 0.0, {}, 0.0
        for lo in range(0, len(indices), t.micro_batch_size):
            loss, metrics, weight = self._micro_loss(indices[lo : lo + t.micro_batch_size], len(indices), step_tokens)
            loss.backward()
            total_loss += float(loss.detach())
            total_weight += weight
            for key, value in metrics.items():
                weighted[key] = weighted.get(key, 0.0) + value * weight
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        metrics = {"loss": total_loss, **{k: v / total_weight for k, v in weighted.items()}}
        metrics.update(grad_norm=grad_norm, lr=lr)
        metrics["time/train_step"] = time.perf_counter() - start
        return metrics

    def run(self) -> Path:
        with failure_marker(self.run_dir, lambda: self.step):
            return self._run()

    def _run(self) -> Path:
        cfg = self.cfg
        size = cfg.train.batch_size
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=self.method,
            disable=not cfg.logging.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        for step in range(self.start_step + 1, self.total_steps + 1):
            self.step = step
            indices = batch_indices(len(self.rows), size, step - 1, cfg.seed)
            metrics = self.train_step(indices)
            metrics["epoch"] = step * size / len(self.rows)
            self.logger.log(step, metrics)
            if step % cfg.checkpoint.every_steps == 0 or step == self.total_steps:
                self._checkpoint(step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            bar.update(1)
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        quantized = self.cfg.model.quantize != "none"
        final = full_precision_copy(self.cfg, self.model_path, self.model, self.tokenizer) if quantized else self.model
        save_merged(final, self.tokenizer, self.run_dir / "final")
        self.logger.close()
        rows = read_metrics(self.run_dir)
        curves = CURVES[self.method]
        plot_curves(rows, self.run_dir / "curves.png", curves)
        print(summary_table(rows, [key for key, _ in curves]))
        print(f"run folder: {self.run_dir}")
        return self.run_dir

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _checkpoint(self, step: int) -> None:
        staging = checkpoint_staging(self.run_dir, step)
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        torch.save(state, staging / "trainer.pt")
        trainer_state = {"step": step, "data_position": step * self.cfg.train.batch_size, "seed": self.cfg.seed}
        commit_checkpoint(self.run_dir, staging, step, trainer_state, self.cfg.checkpoint.keep_last)

    def load_checkpoint(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        restore_training_state(state, self.model, self.optimizer, self.scheduler, ckpt)


def run_offline(cfg: RecipeConfig) -> Path:
    """Train an offline recipe (sft, dpo, orpo, reward_model) end to end; returns the run folder."""
    return OfflineTrainer(cfg).run()
