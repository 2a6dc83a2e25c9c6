"""Export a Megatron dist_checkpointing checkpoint to a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --ckpt CKPT --out HF2

CKPT is a checkpoint root (its `latest` step is used) or one step directory. HF2 gets
safetensors shards, model.safetensors.index.json, config.json and the tokenizer files, loadable by
transformers and vLLM as is. One process on CPU; one layer in memory at a time, written in place
into shards planned before any weight is read.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from megatron_rlsd.checkpoint.cli import run_conversion_tool


def convert(args: argparse.Namespace):
    from megatron_rlsd.checkpoint.convert import megatron_to_hf

    return megatron_to_hf(args.ckpt, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.quiet)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint root or step directory")
    parser.add_argument("--out", required=True, help="new (or empty) HF output directory")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors shard (GiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return run_conversion_tool("convert_megatron_to_hf", parser, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
