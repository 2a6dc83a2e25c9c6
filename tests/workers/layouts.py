"""torchrun worker (4 ranks): one training step on a fixed batch at TP1PP1 (DP4), TP2PP1 (DP2)
and TP2PP2 (DP1); the step's metrics must not depend on the layout.

The layouts are built in turn in one process group (Megatron's parallel state re-initialised),
each from the same HF weights; the batch (prompts, responses, rewards) is the same global batch
everywhere. For every loss mode in MODES one trainer step after the rollouts (student and
teacher scoring, token credit, update) runs through the real Trainer stages, and the reduced
metrics (loss, gradient norm, entropy, clip shares, teacher-student gap, surrogate statistics)
are written to a JSON report on rank 0. Then, at TP1PP1 in bf16: the warm start must leave the
RL optimizer's fp32 main weights equal to the warmed-up model (an lr-0 RL step keeps them).

    torchrun --nproc-per-node 4 tests/workers/layouts.py REPORT.json HF_DIR DATA.jsonl OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_rlsd.build import build  # noqa: E402
from megatron_rlsd.config import load_config  # noqa: E402
from megatron_rlsd.metrics import Accumulator  # noqa: E402
from megatron_rlsd.optimizer import update  # noqa: E402
from megatron_rlsd.parallel import all_reduce_scalar, init_distributed  # noqa: E402
from megatron_rlsd.rollout.samples import Sample  # noqa: E402
from megatron_rlsd.trainer import Trainer  # noqa: E402
from megatron_rlsd.warm_start import warm_start  # noqa: E402

LAYOUTS = ((1, 1), (2, 1), (2, 2))
MODES = ("rlsd", "grpo_opsd", "sdpo")
KEYS = ("loss", "grad_norm", "entropy", "clip_low", "clip_high", "teacher_student_gap", "pg_clip_frac", "pg_approx_kl")


def config(hf_dir, data, out, tp, pp, *extra):
    return load_config("examples/tiny_cpu.yaml", [
        f"model.hf_dir={hf_dir}", f"data.train_file={data}", f"trainer.output_dir={out}", "demo.tiny_model=",
        "demo.synthetic_task=", f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        "trainer.micro_batch_size=4", "rollout.group_size=4", "optim.lr=1e-2", "rollout.temperature=0.7",
        "optim.grad_clip=0.5", *extra,
    ])  # fmt: skip


def fixed_batch(trainer, n_prompts=4):
    """The same global batch on every rank and layout: the first rows' prompts, responses of
    varied length (the ideal solution, a cut of it, or other tokens) and rewards with variance in
    every group; one correct response per group (SDPO's teacher context)."""
    c, g = trainer.c, trainer.cfg.rollout.group_size
    gen = torch.Generator().manual_seed(0)
    samples = []
    for gi, row in enumerate(c.rows[:n_prompts]):
        sp, vision = c.encoder.encode(c.templates.student_messages(row), row.images)
        tp, _ = c.encoder.encode(c.templates.teacher_messages(row), row.images)
        ideal = c.tokenizer(row.solution, add_special_tokens=False).input_ids + [c.tokenizer.eos_token_id]
        for j in range(g):
            s = Sample(row=row, group=gi, student_prompt=sp, teacher_prompt=tp, vision=vision)
            if j == 0:
                s.response = ideal
            else:
                n = 3 + int(torch.randint(0, 12, (1,), generator=gen))
                s.response = torch.randint(3, len(c.tokenizer) - 8, (n,), generator=gen).tolist()
            s.text = c.tokenizer.decode(s.response, skip_special_tokens=True)
            s.rollout_logprobs = [0.0] * len(s.response)
            s.correct = j == 0
            s.reward = float(s.correct)
            samples.append(s)
    trainer.compute_advantages(samples)
    trainer.mode.teacher_prompts(samples, c.templates, c.encoder.encode)
    return samples


def one_step(trainer, samples) -> dict:
    acc = Accumulator()
    batch = trainer.local_batch(samples)
    teacher = trainer.score_teacher(batch)
    update = trainer.policy_update(batch, samples, teacher, acc)
    return {k: v for k, v in (acc.reduce() | update).items() if k in KEYS}


def gradients_of_one_update(trainer, samples, separate_student_pass: bool) -> list[torch.Tensor]:
    """The (clipped) gradients of one optimizer step through the trainer's own update; the old
    log-probs either from a separate student pass or (the default with one step per batch) from
    the update's own forward."""
    batch = trainer.local_batch(samples)
    teacher = trainer.score_teacher(batch)
    old = trainer.score_student(batch) if separate_student_pass else None
    micro_batches, loss_fn = trainer.update_inputs(batch, trainer.mode.denominator(samples), old, teacher, Accumulator())
    update(trainer.c.model, trainer.c.optimizer, micro_batches, loss_fn)
    return [p.main_grad.detach().clone() for p in trainer.module.parameters()]


def max_diff(a, b) -> float:
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return all_reduce_scalar(diff, op=dist.ReduceOp.MAX)


def count_calls(optimizer, names=("prepare_grads", "get_grad_norm", "step_with_ready_grads", "step")) -> dict:
    """Wrap the optimizer's methods to count how often one update calls them."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(optimizer, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(optimizer, name, counted)
    return calls


def relayout(tp, pp):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def main(report_path, hf_dir, data, out):
    cfg = config(hf_dir, data, out, 1, 1)
    platform = init_distributed(cfg.parallel)
    report = {"layouts": {}}
    for tp, pp in LAYOUTS:
        relayout(tp, pp)
        per_mode = {}
        for mode in MODES:
            cfg = config(hf_dir, data, out, tp, pp, f"algorithm.loss_mode={mode}")
            trainer = Trainer(cfg, build(cfg, platform, with_engine=False))
            calls = count_calls(trainer.c.optimizer)
            per_mode[mode] = one_step(trainer, fixed_batch(trainer))
        report["layouts"][f"tp{tp}pp{pp}"] = per_mode
        report.setdefault("optimizer_calls", calls)  # of the last update (one per layout alike)

    # at TP2PP2: what must change nothing numerically
    variants = {"fused": ([], False), "separate_student_pass": ([], True),
                "token_budget": (["trainer.max_tokens_per_microbatch=80", "trainer.micro_batch_size=16"], False),
                "one_micro_batch": (["trainer.micro_batch_size=16"], False),
                "teacher_on_host": (["offload.teacher=true", "offload.grads=true", "offload.optimizer=true"], False)}  # fmt: skip
    after = {}
    for name, (overrides, separate) in variants.items():
        cfg = config(hf_dir, data, out, 2, 2, *overrides)
        trainer = Trainer(cfg, build(cfg, platform, with_engine=False))
        samples = fixed_batch(trainer)
        if name == "token_budget":
            groups = trainer._groups(trainer.local_batch(samples), teacher=False)
            report["token_budget_groups"] = [len(g) for g in groups]
        after[name] = gradients_of_one_update(trainer, samples, separate)
    report["equivalence"] = {name: max_diff(g, after["fused"]) for name, g in after.items()}
    report["gradient_size"] = max_diff(after["fused"], [torch.zeros_like(g) for g in after["fused"]])
    cfg = config(hf_dir, data, out, 2, 2, "trainer.mini_batches_per_step=2")
    trainer = Trainer(cfg, build(cfg, platform, with_engine=False))
    report["two_mini_batches"] = one_step(trainer, fixed_batch(trainer))

    # warm start in bf16 with the one optimizer: the RL step that follows starts from the
    # warmed-up weights (an lr-0 step leaves them exactly as they are)
    relayout(1, 1)
    cfg = config(hf_dir, data, out, 1, 1, "model.params_dtype=bfloat16", "trainer.warmup_sft_steps=3", "trainer.warmup_sft_lr=5e-3")
    trainer = Trainer(cfg, build(cfg, platform, with_engine=False))
    before = [p.detach().clone() for p in trainer.module.parameters()]
    warm_start(trainer.c, cfg)
    warmed = [p.detach().clone() for p in trainer.module.parameters()]
    for group in trainer.c.optimizer.param_groups:
        group["lr"] = 0.0
    after_rl = one_step(trainer, fixed_batch(trainer))
    final = list(trainer.module.parameters())
    report["bf16_warm_start"] = {
        "dtype": str(final[0].dtype),
        "warm_start_moved_weights": any(not torch.equal(a, b) for a, b in zip(before, warmed)),
        "lr0_step_kept_warm_weights": all(torch.equal(a, b.detach()) for a, b in zip(warmed, final)),
        "grad_norm": after_rl["grad_norm"],
    }
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
