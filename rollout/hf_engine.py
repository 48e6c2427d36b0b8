"""The `hf` inference engine: transformers `generate` on one model, batched, with the sampler's per-token log-probs.

Log-probs are what RL importance ratios are built on, so they must equal a teacher-forced recomputation
`log_softmax(logits / T)` of the same model. They are recorded while generating by a logits processor
(`_Sampler`) that sees the raw float32 logits. This keeps one `[B, V]` row per step in memory instead of
`output_logits=True`, which would hold every step's logits (`B x T x V` floats: 20 GB for 64 x 512 tokens at a 151k
vocabulary). For the same reason the model's own `generation_config` (a hub model's sampling defaults, repetition
penalty, suppressed tokens) is replaced by one that holds only the special token ids: nothing but `SamplingParams`
shapes the sampler.

Sampling is the same processor's job too: `generate` runs in greedy mode and `_Sampler` hands it scores whose argmax is
the token it drew from `softmax(logits / T)` (after top-k, then top-p, as `generate` orders its warpers) by inverting
the float64 cumulative distribution with one uniform number per row. `generate`'s own sampler (`torch.multinomial`)
draws an exponential number per vocabulary entry: 30 ms of each decoding step of 32 rows x 49k vocabulary on 2 CPU
cores, a fifth of the hf engine's time on the GRPO bench, against 2 ms.

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
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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
from posttrain.rollout.kv_cache import preallocated_cache, select_rows
from posttrain.rollout.types import Completion, PromptResult, SamplingParams


class HFEngine(InferenceEngine):
    """transformers `generate` behind the `InferenceEngine` interface.

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
        self.model.generation_config = GenerationConfig(
            bos_token_id=self._tokenizer.bos_token_id, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id
        )
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
        """One `generate` call on B <= max_batch_size left-padded prompts; returns B completions."""
        input_ids_BP, attention_mask_BP = _left_pad(prompt_ids, self.pad_token_id)
        prompt_width = input_ids_BP.shape[1]
        cache = preallocated_cache(self.model.config, prompt_width + params.max_new_tokens)
        self._prefill_distinct_prompts(prompt_ids, cache)
        sampler = _Sampler(params)
        stop_strings = (
            _FirstStopRecorder(StopStringCriteria(self._tokenizer, list(params.stop)), prompt_width)
            if params.stop
            else None
        )
        sequences_BS = self.model.generate(
            input_ids=input_ids_BP.to(self.device),
            attention_mask=attention_mask_BP.to(self.device),
            do_sample=False,  # `sampler` draws the token; greedy decoding then picks it
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            past_key_values=cache,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([stop_strings] if stop_strings else []),
        )
        new_tokens_BL = sequences_BS[:, prompt_width:].cpu()
        logprobs_BL = sampler.finish(sequences_BS)[:, : new_tokens_BL.shape[1]].cpu()
        stop_lengths_B = stop_strings.lengths(len(prompt_ids)) if stop_strings else [0] * len(prompt_ids)
        completions = []
        for row, tokens in enumerate(new_tokens_BL.tolist()):
            end, finish_reason = self._completion_end(tokens, stop_lengths_B[row])
            token_ids = tokens[:end]
            completions.append(
                Completion(
                    token_ids=token_ids,
                    text=self._tokenizer.decode(token_ids, skip_special_tokens=True),
                    logprobs=logprobs_BL[row, :end].tolist(),
                    finish_reason=finish_reason,
                )
            )
        return completions

    def _prefill_distinct_prompts(self, prompt_ids: list[list[int]], cache) -> None:
        """Fill `cache` with every row's prompt but its last token, computing each distinct prompt once.

        The n samples of a prompt are n rows with the same prompt; `generate` would run the prompt through the model
        for each (on the GRPO bench, 32 rows of ~45 prompt tokens: a quarter of `generate`'s time). The distinct
        prompts, left-padded to the same width, fill the cache once; their rows are then copied to every sample's
        row, and `generate` starts from the last prompt token. Nothing is done when no prompt repeats or the prompts
        are one token long (the cache stays empty and `generate` computes the prompts itself).
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

    def _completion_end(self, tokens: list[int], stop_string_length: int) -> tuple[int, str]:
        """(number of tokens to keep, finish reason): cut after the first EOS or the token completing a stop string.

        `tokens` is the row of `generate`'s output after the prompt; rows that finished before the longest one are
        filled with padding after their end. `stop_string_length` is the token count at which a stop string first
        matched (0: never).
        """
        end = next((i + 1 for i, token in enumerate(tokens) if token in self.eos_token_ids), 0)
        if stop_string_length and (not end or stop_string_length < end):
            end = stop_string_length
        return (end, "stop") if end else (len(tokens), "length")


class _Sampler(LogitsProcessor):
    """Draws each step's tokens and records `log_softmax(logits / temperature)` of each chosen token, one `[B]` row per
    generated token (greedy: the raw logits' log-softmax, and `generate`'s argmax picks).

    When sampling, the returned scores are -inf except 0 at the drawn token, so `generate` in greedy mode picks it.
    The token is drawn from `softmax(logits / T)` restricted by top-k and then top-p (transformers' warpers, applied to
    the log-probs) by inverse transform sampling: one uniform number per row against the float64 cumulative sum.

    `generate` calls logits processors on step t's logits before picking token t, and the chosen token only shows up
    as the last column of `input_ids` at step t + 1 (or in the final sequences), so each step's log-softmax is kept
    until the next call.
    """

    def __init__(self, params: SamplingParams):
        self.temperature = params.temperature or 1.0  # greedy log-probs come from the raw logits
        self.sample = params.temperature > 0
        self.warpers = []
        if self.sample and params.top_k:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if self.sample and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        self._pending_BV: torch.Tensor | None = None
        self._logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._collect(input_ids)
        logprobs_BV = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self._pending_BV = logprobs_BV
        if not self.sample:
            return scores
        warped_BV = logprobs_BV
        for warper in self.warpers:
            warped_BV = warper(input_ids, warped_BV)
        tokens_B1 = draw(warped_BV)
        return torch.full_like(scores, -torch.inf).scatter_(1, tokens_B1, 0.0)

    def finish(self, sequences_BS: torch.Tensor) -> torch.Tensor:
        """The recorded log-probs `[B, L]` for the L tokens `generate` produced (given its output sequences)."""
        self._collect(sequences_BS)
        if not self._logprobs:
            return torch.zeros(sequences_BS.shape[0], 0)
        return torch.stack(self._logprobs, dim=1)

    def _collect(self, input_ids: torch.Tensor) -> None:
        if self._pending_BV is not None:
            self._logprobs.append(self._pending_BV.gather(1, input_ids[:, -1:]).squeeze(1))
            self._pending_BV = None


def draw(logits_BV: torch.Tensor) -> torch.Tensor:
    """One token per row from `softmax(logits_BV)` (-inf entries never), `[B, 1]` long, by inverse transform sampling
    with `torch.rand` (the caller's generator state decides the draw).

    The cumulative sum is float64 so that tokens of probability ~1e-9 keep their share (in float32, increments below
    ~3e-8 vanish next to a running sum near 1). Each row needs at least one finite entry.
    """
    cdf_BV = (logits_BV.double() - logits_BV.max(dim=-1, keepdim=True).values.double()).exp_().cumsum_(dim=-1)
    total_B1 = cdf_BV[:, -1:]
    # u < total strictly, so the first cdf entry above u is a token with non-zero probability
    u_B1 = torch.minimum(torch.rand_like(total_B1) * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    return torch.searchsorted(cdf_BV, u_B1, right=True).clamp_(max=logits_BV.shape[-1] - 1)


class _FirstStopRecorder(StoppingCriteria):
    """Wraps transformers' `StopStringCriteria` and remembers, per row, how many tokens it had when it first matched.

    `generate` pads rows once they are done, so the match position is lost in its output; the engine needs it to cut
    the completion right after the token that completes the stop string (including a match that began in the prompt).
    """

    def __init__(self, inner: StoppingCriteria, prompt_width: int):
        self.inner = inner
        self.prompt_width = prompt_width
        self.lengths_B: torch.Tensor | None = None  # 0 = no match yet

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done_B = self.inner(input_ids, scores, **kwargs)
        if self.lengths_B is None:
            self.lengths_B = torch.zeros(input_ids.shape[0], dtype=torch.long)
        first_B = done_B.cpu() & (self.lengths_B == 0)
        self.lengths_B[first_B] = input_ids.shape[1] - self.prompt_width
        return done_B

    def lengths(self, batch_size: int) -> list[int]:
        """Per row, the number of generated tokens when a stop string first matched (0: never)."""
        return [0] * batch_size if self.lengths_B is None else self.lengths_B.tolist()


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
