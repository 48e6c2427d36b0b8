"""How far a QLoRA policy's log-probs are from an engine that holds the checkpoint's full-precision weights, and from
one that holds the dequantized merge (`models.lora.merged_state_dict`), on SmolLM2-135M-Instruct.

Three models score the same chat-formatted text (teacher forcing): the QLoRA policy (4-bit base, fresh adapter: B = 0,
so it computes exactly its 4-bit base), a plain model with the checkpoint's weights (what a rollout engine holds
before any sync), and a plain model loaded with the QLoRA policy's merged state dict (what the first sync gives the
engines). Prints the mean and max |log-prob difference| of the completion's tokens. CPU, about a minute.

    python bench/qlora_logprob_gap.py [--quantize nf4|fp4] [--dtype float32]
"""

from __future__ import annotations

import argparse

import torch

from posttrain.models.loading import format_prompt, load_model, load_tokenizer, resolve_model_path
from posttrain.models.lora import LoraSettings, apply_lora, merged_state_dict

PROMPT = "What is 3 + 4?"
COMPLETION = "3 + 4 = \\boxed{7}. The answer is seven, because three plus four makes seven."


def token_logprobs(model, ids_1T: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1, [T-1]."""
    with torch.no_grad():
        logits = model(ids_1T).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids_1T[0, 1:, None]).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    prompt = format_prompt(tokenizer, PROMPT)
    ids = torch.tensor([tokenizer(prompt + COMPLETION, add_special_tokens=False)["input_ids"]])
    completion_tokens = ids.shape[1] - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    policy = apply_lora(load_model(path, args.dtype, quantize=args.quantize), LoraSettings(rank=16)).eval()
    checkpoint = load_model(path, args.dtype).eval()
    merged = load_model(path, args.dtype).eval()
    merged.load_state_dict(merged_state_dict(policy), strict=True)
    ours = token_logprobs(policy, ids)[-completion_tokens:]
    print(f"SmolLM2-135M-Instruct, {args.quantize} base, {args.dtype}, {completion_tokens} completion tokens")
    for name, model in (("checkpoint weights", checkpoint), ("dequantized merge", merged)):
        gap = (token_logprobs(model, ids)[-completion_tokens:] - ours).abs()
        print(f"|QLoRA policy - engine with {name}|: mean {float(gap.mean()):.3g}, max {float(gap.max()):.3g}")


if __name__ == "__main__":
    main()
