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

from megatron_rlsd.models.tiny import TinyText, build_tiny_qwen3, summarize_checkpoint
from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

# integer flags -> the TinyText field they set (defaults: TinyText's)
TEXT_FLAGS = {"--layers": "num_layers", "--hidden": "hidden_size", "--heads": "num_heads", "--kv-heads": "num_kv_heads",
              "--head-dim": "head_dim", "--ffn": "intermediate_size", "--seed": "seed"}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--tied", action="store_true", help="tie input embeddings and LM head")
    for flag, field in TEXT_FLAGS.items():
        p.add_argument(flag, dest=field, type=int, default=getattr(TinyText, field), help=f"default {getattr(TinyText, field)}")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="padded vocab size (multiple of 128); default: tokenizer length rounded up")
    p.add_argument("--vl", action="store_true", help="a Qwen3-VL checkpoint (Qwen3VLForConditionalGeneration)")
    p.add_argument("--vision-depth", type=int, help="--vl: vision transformer blocks (default: build_tiny_qwen3_vl's)")
    args = p.parse_args(argv)
    text = {field: getattr(args, field) for field in TEXT_FLAGS.values()}
    text.update(tie_word_embeddings=args.tied, vocab_size=args.vocab_size)
    try:
        if args.vl:
            vision = {} if args.vision_depth is None else {"vision_depth": args.vision_depth}
            path = build_tiny_qwen3_vl(args.out, **vision, **text)
        else:
            path = build_tiny_qwen3(args.out, **text)
    except ValueError as e:
        p.error(str(e))
    s = summarize_checkpoint(path)
    print(
        f"tiny Qwen3{'-VL' if args.vl else ''}: params={s['params']:,} vocab={s['vocab_size']} "
        f"(tokenizer {s['tokenizer_len']}) tied={s['tied']} layers={args.num_layers} "
        f"hidden={args.hidden_size} path={s['path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
