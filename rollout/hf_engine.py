"""The `hf` inference engine: a transformers model decoding batches of prompts with the sampler's per-token log-probs.

Log-probs are what RL importance ratios are built on, so they must equal a teacher-forced recomputation
`log_softmax(logits / T)` of the same model; nothing but `SamplingParams` shapes the sampler (a hub model's
`generation_config` sampling defaults, repetition penalty or suppressed tokens are not used). The decoding loop, the
sampler and why they are not transformers `generate` are in `hf_decode.py`. Two things keep it fast on small machines:
the KV cache is written in place (`kv_cache.py`), and the n samples of a prompt share one computation of the prompt
(`HFEngine._prefill_distinct_prompts`).

Sleep (`rollout.sleep_level`): on a GPU, `sleep` moves the model to CPU memory and `wake_up(["weights"])` moves it
back (levels 1 and 2 alike: this engine keeps no KV cache between calls and no other copy of the weights to refill
from, so there is nothing more to drop). On CPU there is nothing to free; the calls only mark the engine asleep, so
`generate` raises until it is woken, as on a GPU. Weight updates are taken asleep or awake.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from os import PathLike

import torch
from transformers import StopStringCriteria

from posttrain.models.loading import eos_token_ids, load_model, load_tokenizer
from posttrain.models.logprobs import position_ids_from_mask
from posttrain.rollout.engine import (
    InferenceEngine,
    Prompts,
    check_sleep_level,
    check_weight_update,
    tokenize_prompts,
    wake_tags,
)
from posttrain.rollout.hf_decode import Sampler, decode
from posttrain.rollout.kv_cache import preallocated_cache, select_rows
from posttrain.rollout.types import Completion, PromptResult, SamplingParams


class HFEngine(InferenceEngine):
    """A transformers model behind the `InferenceEngine` interface.

    Args:
        model_path: a local HF folder or a name `posttrain.models.loading.load_model` resolves.
        dtype: "float32", "bfloat16" or "float16".
        max_batch_size: sequences (prompts x n) generated together; larger batches are processed in chunks.
        num_threads: torch CPU threads for this process (`torch.set_num_threads`); None leaves the setting alone.
        device: where the model runs; None picks "cuda" when available, else "cpu".
    """

    def __init__(
        self,
        model_path: str | PathLike,
        dtype: str = "float32",
        max_batch_size: int = 64,
        num_threads: int | None = None,
        device: str | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.max_batch_size = max_batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._tokenizer = load_tokenizer(str(model_path), padding_side="left")
        self.model = load_model(str(model_path), dtype=dtype).to(self.device).eval()
        self.eos_token_ids = eos_token_ids(self._tokenizer, self.model.generation_config)
        self.pad_token_id = self._tokenizer.pad_token_id
        # detached views sharing storage with the parameters: copying into them updates the model in place
        self._tensors = self.model.state_dict()
        self._asleep = False

    @property
    def tokenizer(self):
        return self._tokenizer

    def generate(self, prompts: Prompts, params: SamplingParams) -> list[PromptResult]:
        """See `InferenceEngine.generate`. Sequences are flattened prompt-major (prompt 0's n samples first)."""
        if self._asleep:
            raise RuntimeError("the hf engine is asleep; wake_up() first")
        prompt_ids = tokenize_prompts(self._tokenizer, prompts)
        results = [PromptResult(prompt_token_ids=ids) for ids in prompt_ids]
        owners = [i for i in range(len(prompt_ids)) for _ in range(params.n)]  # flat sequence -> prompt index
        with _seeded(params.seed, self.device), torch.inference_mode():
            for start in range(0, len(owners), self.max_batch_size):
                chunk = owners[start : start + self.max_batch_size]
                completions = self._generate_batch([prompt_ids[i] for i in chunk], params)
                for owner, completion in zip(chunk, completions, strict=True):
                    results[owner].completions.append(completion)
        return results

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """See `InferenceEngine.load_weights`; tensors are cast to the model's dtype and device."""
        check_weight_update({name: tensor.shape for name, tensor in self._tensors.items()}, weights)
        with torch.no_grad():
            for name, tensor in weights.items():
                self._tensors[name].copy_(tensor)

    def get_weights(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """See `InferenceEngine.get_weights`; ValueError for an unknown name."""
        names = list(self._tensors) if names is None else list(names)
        for name in names:
            if name not in self._tensors:
                raise ValueError(f"unknown weight {name!r}: the model has no tensor of that name")
        return {name: self._tensors[name].detach().to("cpu", copy=True) for name in names}

    def sleep(self, level: int) -> None:
        """See `InferenceEngine.sleep` and the module docstring: on a GPU the model moves to CPU memory."""
        check_sleep_level(level)
        if not self._asleep and self.device.type != "cpu":
            self._move(torch.device("cpu"))
            torch.cuda.empty_cache()
        self._asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """See `InferenceEngine.wake_up`: "weights" brings the model back; "kv_cache" alone changes nothing."""
        if self._asleep and "weights" in wake_tags(tags):
            if self.device.type != "cpu":
                self._move(self.device)
            self._asleep = False

    @property
    def is_sleeping(self) -> bool:
        return self._asleep

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        self._tensors = self.model.state_dict()  # `to` gives the parameters new storage: new views

    def _generate_batch(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        """B <= max_batch_size left-padded prompts decoded together (`hf_decode.decode`); returns B completions."""
        input_ids_BP, attention_mask_BP = _left_pad(prompt_ids, self.pad_token_id)
        cache = preallocated_cache(self.model.config, input_ids_BP.shape[1] + params.max_new_tokens)
        self._prefill_distinct_prompts(prompt_ids, cache)
        stop = None
        if params.stop:
            criteria = StopStringCriteria(self._tokenizer, list(params.stop))
            stop = lambda sequences_bS: criteria(sequences_bS, None)  # noqa: E731
        decoded = decode(
            self.model,
            input_ids_BP.to(self.device),
            attention_mask_BP.to(self.device),
            cache,
            Sampler(params, len(prompt_ids)),
            params.max_new_tokens,
            self.eos_token_ids,
            stop,
        )
        return [
            Completion(
                token_ids=row.token_ids,
                text=self._tokenizer.decode(row.token_ids, skip_special_tokens=True),
                logprobs=row.logprobs,
                finish_reason=row.finish_reason,
            )
            for row in decoded
        ]

    def _prefill_distinct_prompts(self, prompt_ids: list[list[int]], cache) -> None:
        """Fill `cache` with every row's prompt but its last token, computing each distinct prompt once.

        The n samples of a prompt are n rows with the same prompt; decoding would run the prompt through the model
        for each (on the GRPO bench, 32 rows of ~45 prompt tokens: a quarter of the decoding time). The distinct
        prompts, left-padded to the same width, fill the cache once; their rows are then copied to every sample's
        row, and `decode` starts from the last prompt token. Nothing is done when no prompt repeats or the prompts
        are one token long (the cache stays empty and `decode` computes the prompts itself).
        """
        distinct: dict[tuple[int, ...], int] = {}
        owner_B = [distinct.setdefault(tuple(ids), len(distinct)) for ids in prompt_ids]
        if len(distinct) == len(prompt_ids) or max(map(len, prompt_ids)) < 2:
            return
        ids_GP, mask_GP = _left_pad([list(ids) for ids in distinct], self.pad_token_id)
        ids_GP, mask_GP = ids_GP[:, :-1].to(self.device), mask_GP[:, :-1].to(self.device)
        self.model(
            input_ids=ids_GP,
            attention_mask=mask_GP,
            position_ids=position_ids_from_mask(mask_GP),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if not select_rows(cache, torch.tensor(owner_B, device=self.device)):
            cache.reset()


def _left_pad(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids [B, P]` and `attention_mask [B, P]` with every prompt right-aligned (ending at column P - 1)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids_BP = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask_BP = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids_BP[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask_BP[row, width - len(ids) :] = 1
    return input_ids_BP, attention_mask_BP


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's generators for the block when `seed` is given, then restore the caller's generator state."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
