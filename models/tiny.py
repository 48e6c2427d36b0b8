"""Tiny random Llama models with a real tokenizer and chat template, built offline in well under a second for tests.

The tokenizer is character level over printable ASCII plus newline and tab, with byte fallback (`<0xNN>` tokens) so
any UTF-8 text round-trips through encode/decode. Special tokens: `<|pad|>` (pad), `<|im_start|>` (bos),
`<|im_end|>` (eos). No special tokens are added when encoding (like SmolLM2 and Qwen): the ChatML template writes
them, so a formatted prompt is tokenized with `add_special_tokens=False` or True to the same ids.

With `tokenizer=` a tiny model takes a real model's tokenizer instead (a random student that can be distilled
from that model):

    python -m posttrain.models.tiny runs/smollm2-tiny --tokenizer smollm2-135m-instruct --hidden-size 128
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Random init with std 0.1 (not Llama's 0.02) so that attention is not near-uniform and logits are not near-flat:
# tests of position ids, padding and LoRA merging then see differences well above float noise.
INIT_STD = 0.1


def build_tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (~360 tokens) with byte fallback and a ChatML chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))  # letters, digits, punctuation, space, \n, \t
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in chars:
        vocab[char] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    # BPE without merges = one token per character; byte_fallback spells unknown characters as UTF-8 bytes
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # registered as special added tokens (keeping their vocab ids 0-2) so "<|im_end|>" in text is one token
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tokenizer: str | None = None,
) -> Path:
    """Write a randomly initialised `LlamaForCausalLM` (fp32) and its tokenizer to `out_dir` with `save_pretrained`.

    Args:
        out_dir: folder to write (created; existing files are overwritten).
        hidden_size: model width; must be divisible by `num_heads`. MLP width is 2 * hidden_size.
        num_layers: decoder layers.
        num_heads: query heads; key/value heads are num_heads // 2 when even (grouped-query attention, as in the
            real models), else num_heads.
        seed: torch seed for the weights (same seed -> bitwise same weights).
        tokenizer: a model folder, hub id or alias whose tokenizer (vocabulary, special tokens, chat template) the
            tiny model uses instead of the character-level one, e.g. a random student that shares a real teacher's
            tokenizer for on-policy distillation. The embedding then has that tokenizer's size (SmolLM2: 49152).
    Returns:
        `out_dir` as a Path, loadable with `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    else:
        from posttrain.models.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2 if num_heads % 2 == 0 else num_heads,
        max_position_embeddings=512,
        initializer_range=INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=torch.float32,
    )
    with torch.random.fork_rng(devices=[]):  # seed the CPU generator without disturbing the caller's RNG state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_model_path(
    *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0, tokenizer: str | None = None
) -> Path:
    """Build a tiny model once per argument set and return its cached folder (same kwargs as `build_tiny_model`).

    The folder is `<tempdir>/posttrain-tiny/<hash>`, where the hash covers the arguments, this file's source and
    the transformers version, so code changes never reuse a stale model. It is built in a temporary folder and
    renamed into place: a folder that exists is complete, and racing processes each build and one rename wins.
    """
    import transformers

    kwargs = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, seed=seed)
    if tokenizer is not None:  # the resolved folder is part of the key (an alias may move with its cache)
        from posttrain.models.loading import resolve_model_path

        kwargs["tokenizer"] = resolve_model_path(tokenizer)
    key = json.dumps(kwargs, sort_keys=True) + transformers.__version__ + Path(__file__).read_text()
    root = Path(tempfile.gettempdir()) / "posttrain-tiny"
    final = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_tiny_model(tmp_dir, **kwargs)
        os.chmod(tmp_dir, 0o755)
        try:
            os.rename(tmp_dir, final)
        except OSError:  # another process renamed its build first (the target exists and is not empty)
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Llama model (a student for quick experiments).")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--tokenizer", help="model folder, hub id or alias whose tokenizer to use (default: characters)"
    )
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build_tiny_model(
        args.out_dir,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        seed=args.seed,
        tokenizer=args.tokenizer,
    )
    print(out)


if __name__ == "__main__":
    main()
