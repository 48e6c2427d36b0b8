"""Loading causal LMs and tokenizers by name or path, dtype names, the process's float32 matmul precision, and
turning prompts into model-ready text.

Prompt text convention (every engine and learner relies on it): `format_prompt` returns a string that already
holds every special token the model expects (chat markers, and the BOS token when the tokenizer normally adds one),
so it is tokenized with `tokenizer(text, add_special_tokens=False)`; never let the tokenizer add a second BOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.models.locations import check_hub_model, check_model_path

if TYPE_CHECKING:  # transformers is imported inside the functions that use it
    from transformers import GenerationConfig

DEMO_MODEL_ALIASES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(precision: str, key: str = "matmul_precision") -> None:
    """`torch.set_float32_matmul_precision` for this whole process (every float32 matmul it runs from now on).

    Called where a process that runs a model sets itself up (learner, critic, teacher and rollout worker actors, the
    offline trainer, `posttrain eval`), next to its thread count. "highest" is torch's default: exact float32.
    "medium" lets a float32 matmul round its inputs to bf16 and accumulate in float32 (oneDNN on CPUs with AMX-bf16;
    where no such kernel exists torch falls back to "high"); "high" allows TF32 on GPUs (with torch 2.13 on CPU it
    computes as "highest"). Bad values raise naming `key`, the recipe key they came from."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"{key}: unknown {precision!r}; allowed: {', '.join(MATMUL_PRECISIONS)}")
    torch.set_float32_matmul_precision(precision)


def resolve_model_path(name_or_path: str, key: str | None = None) -> str:
    """Map a model name to what `from_pretrained` should load.

    The demo aliases ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", any case) become the local
    converted demo folder (converted from the GGUF on first use, see `models.demo`); an existing local folder is
    returned unchanged, and so is anything else (a hub id, loaded by transformers as usual). With `key` (the recipe
    key it came from; the run's driver passes it, actors do not), a missing folder or a hub id that is neither
    cached nor reachable raises `ModelNotFoundError` naming the key, in seconds (`models.locations`).
    """
    if Path(name_or_path).expanduser().is_dir():
        return name_or_path
    if name_or_path.lower() in DEMO_MODEL_ALIASES:
        from posttrain.models.demo import demo_model_path

        return str(demo_model_path())
    if key is not None:
        check_model_path(key, name_or_path)
        check_hub_model(key, name_or_path)
    return name_or_path


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for "float32"/"fp32", "bfloat16"/"bf16" or "float16"/"fp16"; ValueError otherwise."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, quantize: str = "none"):
    """Load a causal LM (`AutoModelForCausalLM`) on CPU in `dtype`; the train/eval mode is left as transformers sets it.

    Args:
        name_or_path: a local folder, a demo alias or a hub id (see `resolve_model_path`).
        dtype: a name accepted by `torch_dtype`.
        trust_remote_code: passed to transformers.
        quantize: "none", or "nf4" / "fp4": the linear layers' weights held in 4 bits by bitsandbytes (QLoRA's base;
            computed in `dtype`; embeddings, norms and the LM head stay in `dtype`). Needs `pip install bitsandbytes`.
    Returns:
        a `PreTrainedModel`.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from posttrain.models.attention import use_grouped_sdpa

    hf_logging.disable_progress_bar()  # per-actor weight-loading bars would interleave with the run's progress bar
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=torch_dtype(dtype),
        trust_remote_code=trust_remote_code,
        **quantization_kwargs(quantize, dtype),
    )
    use_grouped_sdpa(model)  # no copy of the key/value heads per layer (models/attention.py)
    return keep_4bit_layout(model) if quantize != "none" else model


def keep_4bit_layout(model):
    """Keep every bitsandbytes 4-bit layer in its one storage layout; returns `model`.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first eval-mode no-grad forward into an
    inference layout whose block scales are rounded to bfloat16 (and stays repacked): a trainer's no-grad passes
    (lp_old, the reference) would then compute with other weights than its training passes and than the dequantized
    weights sent to the rollout engines (`models.lora.dequantized_weight`). Turned off here for every 4-bit layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def quantization_kwargs(quantize: str, dtype: str) -> dict:
    """`from_pretrained` keyword arguments that load the linear layers 4-bit (bitsandbytes "nf4" / "fp4", computed in
    `dtype`, on CPU), or none for "none"."""
    if quantize == "none":
        return {}
    if quantize not in ("nf4", "fp4"):
        raise ValueError(f"unknown quantize {quantize!r}; allowed: none, nf4, fp4")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=torch_dtype(dtype)
    )
    return {"quantization_config": config, "device_map": "cpu"}


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """Load a tokenizer that always has a pad token (the EOS token when the model defines none).

    Args:
        name_or_path: a local folder, a demo alias or a hub id (see `resolve_model_path`).
        padding_side: "left" (generation: prompts end at the same column) or "right" (training batches).
    Returns:
        a `PreTrainedTokenizerBase` with `pad_token_id` set.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), padding_side=padding_side)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def format_prompt(
    tokenizer,
    prompt: str | list[dict],
    system_prompt: str | None = None,
    use_chat_template: bool = True,
) -> str:
    """Turn a prompt into the exact text the model continues; tokenize it with `add_special_tokens=False`.

    Args:
        tokenizer: the model's tokenizer.
        prompt: a plain string (one user message) or chat messages `[{"role": ..., "content": ...}, ...]`.
        system_prompt: prepended as a system message, unless the messages already start with their own.
        use_chat_template: apply the tokenizer's chat template with the generation prompt (the assistant header);
            when False, or when the tokenizer has no template, the text is used as is: the system prompt, a blank
            line, then the prompt (message contents joined by blank lines).
    Returns:
        the prompt text, starting with the BOS token if (and only if) the tokenizer adds one by default.
    """
    messages = chat_messages(prompt, system_prompt)
    if use_chat_template and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(message["content"] for message in messages)
    bos = default_bos(tokenizer)
    if bos is not None and not text.startswith(bos):
        text = bos + text
    return text


def chat_messages(prompt: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """A prompt as chat messages: a string becomes one user message; `system_prompt` is put first unless the
    messages already start with a system message. Returns a new list (the input is not modified)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def default_bos(tokenizer) -> str | None:
    """The BOS token text if `tokenizer(text)` prepends it by default (Llama-2 style), else None (SmolLM2, Qwen)."""
    if tokenizer.bos_token_id is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if with_special and with_special[0] == tokenizer.bos_token_id else None


def eos_token_ids(tokenizer, generation_config: GenerationConfig) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (chat models often end on several): where
    both rollout engines stop."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    configured = generation_config.eos_token_id
    for token in [configured] if isinstance(configured, int) else configured or []:
        if token not in ids:
            ids.append(token)
    if not ids:
        raise ValueError("the model defines no EOS token; generation could only stop at max_new_tokens")
    return ids
