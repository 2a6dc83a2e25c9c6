"""Convert a Hugging Face model folder into a Megatron dist_checkpointing checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out CKPT

CKPT becomes a checkpoint root (hf/ with config and tokenizer, step_0000000/, latest) that the
trainer and convert_megatron_to_hf.py load at any TP/PP. Runs in one process on CPU; tensors are
memory-mapped and streamed, never all held in memory.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from megatron_rlsd.checkpoint.cli import run_conversion_tool


def convert(args: argparse.Namespace):
    from megatron_rlsd.checkpoint.convert import hf_to_megatron

    return hf_to_megatron(args.hf_dir, args.out, allow_pickle=args.allow_pickle, progress=not args.quiet)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF folder with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="new (or empty) checkpoint root directory")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pytorch_model*.bin pickles (loaded with weights_only=True); only for trusted files")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return run_conversion_tool("convert_hf_to_megatron", parser, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
