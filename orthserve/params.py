"""Print the trainable-parameter count of an adapter configuration on any model.

    python -m orthserve.params --model ViT-B-16 --adapter orthogonal --blocks 4
"""
from __future__ import annotations

import argparse

import torch

from .adapters import AOFTConfig, LoRAConfig, OrthogonalConfig
from .classifier import is_text_side
from .surgery import adapter_parameters, inject


def count_by_tower(model: torch.nn.Module) -> dict[str, int]:
    params = adapter_parameters(model)
    image = sum(p.numel() for n, p in params.items() if not is_text_side(n))
    text = sum(p.numel() for n, p in params.items() if is_text_side(n))
    return {"image": image, "text": text, "total": image + text}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or JSON config (random weights)")
    parser.add_argument("--adapter", choices=["orthcr", "lora", "aoft"], default="orthcr")
    parser.add_argument("--blocks", type=int, default=None, help="orthcr: number of diagonal blocks (default 4)")
    parser.add_argument("--block-size", type=int, default=None, help="orthcr: block size instead of --blocks")
    parser.add_argument("--rank", type=int, default=None, help="lora/aoft rank")
    args = parser.parse_args(argv)

    from .models import load_model

    model, _, _ = load_model(args.model, "none")
    if args.adapter == "orthcr":
        config = OrthogonalConfig(blocks=args.blocks, block_size=args.block_size)
    else:
        cls = LoRAConfig if args.adapter == "lora" else AOFTConfig
        config = cls(rank=args.rank) if args.rank else cls()
    adapted = inject(model, config)
    counts = count_by_tower(model)
    print(f"{args.model} + {config.method} {config.to_dict()}")
    print(f"adapted tensors: {len(adapted)}")
    print(f"trainable parameters: {counts['total']:,} (image {counts['image']:,}, text {counts['text']:,})")


if __name__ == "__main__":
    main()
