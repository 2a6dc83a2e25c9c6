#!/usr/bin/env python
"""Write a tiny random Qwen3 HF checkpoint (model + locally trained tokenizer).

Example:
    python tools/make_tiny_model.py --out outputs/tiny-qwen3 --tied
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from megatron_rlsd.models.tiny import build_tiny_qwen3, summarize_checkpoint


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
    args = p.parse_args(argv)
    try:
        path = build_tiny_qwen3(
            args.out,
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
    except ValueError as e:
        p.error(str(e))
    s = summarize_checkpoint(path)
    print(
        f"tiny Qwen3: params={s['params']:,} vocab={s['vocab_size']} "
        f"(tokenizer {s['tokenizer_len']}) tied={s['tied']} layers={args.layers} "
        f"hidden={args.hidden} path={s['path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
