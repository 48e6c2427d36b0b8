"""A smaller copy of a decoder-only model that keeps its first layers (and its tokenizer): a student for
distillation experiments on machines where no small sibling model is at hand.

    python -m posttrain.models.prune smollm2-135m-instruct runs/smollm2-8l --layers 8
"""

from __future__ import annotations

import argparse
from pathlib import Path


def pruned_copy(source: str, out_dir: str | Path, layers: int) -> Path:
    """Save `source` with only its first `layers` decoder layers (embeddings, final norm and head kept) to
    `out_dir`, with its tokenizer. Works for Llama-style models (`model.model.layers`)."""
    import torch

    from posttrain.models.loading import load_model, load_tokenizer

    model = load_model(source)
    stack = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise ValueError(f"{source}: no `model.layers` decoder stack to prune ({type(model).__name__})")
    if not 1 <= layers <= len(stack):
        raise ValueError(f"layers must be in 1..{len(stack)} for {source}, got {layers}")
    model.model.layers = stack[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:layers]
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    load_tokenizer(source).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="model folder, hub id or alias")
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers to keep (the first ones)")
    args = parser.parse_args()
    print(pruned_copy(args.source, args.out_dir, args.layers))


if __name__ == "__main__":
    main()
