"""Entry point of the main job.

    torchrun --nproc-per-node N -m megatron_rlsd.train --config CONFIG.yaml [section.key=value ...]

The configuration is validated (one clear line on error, exit code 2) before torch.distributed,
Megatron or vLLM are initialised, including its compatibility with the checkpoint it would resume.
Data problems found while setting up (no usable row) are config errors too. Then: distributed
start-up, the demo's files if the config asks for them (megatron_rlsd/demo.py), building
(megatron_rlsd/build.py), training (megatron_rlsd/trainer.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_rlsd.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", required=True, help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=20")
    args = parser.parse_args(argv)

    from megatron_rlsd.config import ConfigError, check_model_fits

    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    def config_error(e: ConfigError) -> int:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron_rlsd.train: config error: {e}", file=sys.stderr, flush=True)
        return 2

    try:
        cfg = checked_config(args.config, args.overrides, world_size)
    except ConfigError as e:
        return config_error(e)

    from megatron_rlsd import demo
    from megatron_rlsd.build import build
    from megatron_rlsd.parallel import destroy_distributed, init_distributed
    from megatron_rlsd.rewards import get_default_verifier
    from megatron_rlsd.trainer import Trainer

    components = trainer = None
    try:
        platform = init_distributed(cfg.parallel)
        get_default_verifier().start()  # reward workers warm up while the model and engines load
        if cfg.demo.enabled:
            demo.prepare(cfg)
            check_model_fits(cfg, world_size)  # the demo's model exists now
        components = build(cfg, platform)
        trainer = Trainer(cfg, components)
        trainer.run()
    except ConfigError as e:  # raised on every rank alike (e.g. a dataset without usable rows)
        return config_error(e)
    finally:
        if trainer is not None:
            trainer.close()
        if components is not None:
            components.engine.close()
        destroy_distributed()
    return 0


def checked_config(path: str, overrides: list[str], world_size: int):
    """The run's config, validated as far as it can be before anything starts: its fields, the
    model against the layout, the checkpoint it would resume, the memory plan. Raises ConfigError."""
    from megatron_rlsd.checkpointer import check_resume
    from megatron_rlsd.config import check_model_fits, load_config

    cfg = load_config(path, overrides)
    check_model_fits(cfg, world_size)
    check_resume(cfg)
    check_memory_plan(cfg, world_size)
    return cfg


def check_memory_plan(cfg, world_size: int) -> None:
    """On GPU, refuse a run whose memory plan (tools/plan_memory.py) cannot fit, naming the knob to
    turn, before anything is allocated. CPU runs have no such budget."""
    import torch

    from megatron_rlsd.config import ConfigError
    from megatron_rlsd.memory_plan import check
    from megatron_rlsd.platform import select_platform

    if select_platform().is_cpu or not (Path(cfg.model.hf_dir) / "config.json").is_file():
        return
    total = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    try:
        check(cfg, world_size, total)
    except ValueError as e:
        raise ConfigError(f"memory plan: {e} (tools/plan_memory.py prints every term)") from None


if __name__ == "__main__":
    sys.exit(main())
