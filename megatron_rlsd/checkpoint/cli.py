"""The shared skeleton of the conversion tools (tools/convert_*.py).

Parse the tool's flags, run one conversion inside a one-process torch.distributed group (Megatron's
checkpointing needs one), and turn bad input into a single `<tool>: error: ...` line and exit
code 2; on success print `wrote <path>` and return 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# What a conversion raises for bad input (missing or unreadable files, a non-empty --out,
# unsupported or inconsistent config / weights); anything else is a bug and keeps its traceback.
BAD_INPUT = (FileNotFoundError, FileExistsError, ValueError, KeyError)


def run_conversion_tool(
    tool: str,
    parser: argparse.ArgumentParser,
    convert: Callable[[argparse.Namespace], Path],
    argv: Sequence[str] | None = None,
) -> int:
    """`convert(args)` returns the path it wrote; the exit code of the tool is returned."""
    args = parser.parse_args(argv)
    from megatron_rlsd.parallel import ParallelConfig, destroy_distributed, init_distributed

    try:
        init_distributed(ParallelConfig())
        written = convert(args)
    except BAD_INPUT as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    print(f"wrote {written}")
    return 0
