#!/usr/bin/env python
"""Write a tiny random Qwen3 HF checkpoint (model + locally trained tokenizer).

With --vl, a tiny Qwen3-VL checkpoint instead (vision tower, image/video processors, chat template
with image placeholders).

Example:
    python tools/make_tiny_model.py --out outputs/tiny-qwen3 --tied
    python tools/make_tiny_model.py --out outputs/tiny-qwen3-vl --vl
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from megatron_rlsd.models.tiny import build_tiny_qwen3, summarize_checkpoint
from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--tied", action="store_true", help="tie input embeddings and LM head")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="padded vocab size (multiple of 128); default: tokenizer length rounded up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vl", action="store_true", help="a Qwen3-VL checkpoint (Qwen3VLForConditionalGeneration)")
    p.add_argument("--vision-depth", type=int, default=2, help="--vl: vision transformer blocks")
    args = p.parse_args(argv)
    common = dict(
        tie_word_embeddings=args.tied,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.ffn,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    try:
        if args.vl:
            path = build_tiny_qwen3_vl(args.out, vision_depth=args.vision_depth, **common)
        else:
            path = build_tiny_qwen3(args.out, **common)
    except ValueError as e:
        p.error(str(e))
    s = summarize_checkpoint(path)
    print(
        f"tiny Qwen3{'-VL' if args.vl else ''}: params={s['params']:,} vocab={s['vocab_size']} "
        f"(tokenizer {s['tokenizer_len']}) tied={s['tied']} layers={args.layers} "
        f"hidden={args.hidden} path={s['path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
