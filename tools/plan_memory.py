"""Per-GPU memory of one training step, phase by phase, for a config on a cluster shape.

    python tools/plan_memory.py --config CFG --nodes N --gpus-per-node G --gpu-memory-gib M \\
        [--model-config CONFIG_JSON] [section.key=value ...]

Prints the rollout, scoring, update and weight-sync phases term by term (docs/memory.md explains
each term) and whether each fits. Exit 0: every phase fits; 1: a phase does not (one line per
phase names the knob to turn); 2: bad input (one `error:` line).

Only the model's config.json is read: `--model-config` when the config's model.hf_dir is not on
this machine (examples/model_configs/ holds Qwen3-8B's and Qwen3-VL-8B-Instruct's). The dataset,
templates and checkpoint the config names need not exist here.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401

PROG = "plan_memory"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def load_for_planning(config: str, overrides: list[str], model_config: str | None, workdir: Path):
    """(config, HF config dict) the way the trainer loads them, with what the plan never reads
    pointed at files that exist: the dataset at the config file itself (validation only checks
    that it exists), the built-in templates, no initial checkpoint; model.hf_dir at a folder
    holding `model_config` when one is given."""
    from megatron_rlsd.config import ConfigError, load_config
    from megatron_rlsd.memory_plan import load_hf_config

    fixed = [f"data.train_file={config}", "data.student_template=", "data.teacher_template=", "model.init_checkpoint="]
    if model_config:
        hf_config = load_hf_config(model_config)
        shutil.copyfile(model_config, workdir / "config.json")
        fixed.append(f"model.hf_dir={workdir}")
    try:
        cfg = load_config(config, [*overrides, *fixed])
    except ConfigError as e:
        hint = "; pass --model-config" if not model_config and "config.json not found" in str(e) else ""
        raise ConfigError(f"{e}{hint}") from None
    if not model_config:
        path = Path(cfg.model.hf_dir) / "config.json"
        if not path.is_file():  # a demo config makes its model at start-up
            raise ValueError(f"model.hf_dir {cfg.model.hf_dir}: config.json not found; pass --model-config")
        hf_config = load_hf_config(path)
    return cfg, hf_config


def main(argv=None) -> int:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see examples/)")
    parser.add_argument("--nodes", required=True, type=_positive(int))
    parser.add_argument("--gpus-per-node", required=True, type=_positive(int))
    parser.add_argument("--gpu-memory-gib", required=True, type=_positive(float), help="memory of one GPU, GiB")
    parser.add_argument("--model-config", help="the model's config.json, when model.hf_dir is not on this machine")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.recompute=full")
    args = parser.parse_args(argv)

    from megatron_rlsd.config import check_model_fits
    from megatron_rlsd.memory_plan import GIB, plan

    world_size = args.nodes * args.gpus_per_node
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, hf_config = load_for_planning(args.config, args.overrides, args.model_config, Path(tmp))
            check_model_fits(cfg, world_size)  # TP/PP against the model and the world, the batch over DP
        result = plan(cfg, world_size, int(args.gpu_memory_gib * GIB), hf_config)
    except (ValueError, KeyError) as e:  # ConfigError is a ValueError; KeyError: a config.json field missing
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"memory plan: {args.config} on {args.nodes} node(s) x {args.gpus_per_node} GPUs")
    print(result.report())
    return 1 if result.failing else 0


if __name__ == "__main__":
    sys.exit(main())
