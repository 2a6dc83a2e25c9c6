"""torchrun worker (4 ranks, TP2PP2): the real trainer, every loss mode, and fault handling.

1. One plain RLSD step at rollout temperature 0.7: the engines' log-probs of their samples must
   equal Megatron's after the weight sync (train_rollout_logp_maxdiff), every weight-sync bucket
   must respect rollout.weight_bucket_mb, and memory changes hands in order (rollouts, engine
   asleep, training state back, the update, training state out, the weight push).
2. One step per loss mode on a batch that is known to contain a correct response in every group
   (sample 0 of each group is replaced by the row's reference solution before rewards are
   computed): losses finite and non-zero, gradient norm > 0, and with Adam's moments reset and
   no weight decay every weight moves against its gradient (first Adam step: sign(dw) =
   -sign(g)). Teacher refreshes every K=2 steps; truncated IS is on (planted samples carry
   rollout log-probs of 0, so their TIS weights are < 1). The credit family runs too: RLRT,
   AntiSD with its gate open (the teacher-entropy median is computed across the pipeline) and
   EGRSD; OPSD's teacher reads the rows' reference solutions; one planted response that cites a
   "reference solution" is the step's only leak (metric `leakage`).
3. An injected NaN loss is skipped (weights unchanged, counted); consecutive NaNs stop the run;
   the last good checkpoint loads back the weights it was saved with.

    torchrun --nproc-per-node 4 tests/workers/loss_modes.py REPORT.json [config overrides...]
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_rlsd import demo  # noqa: E402
from megatron_rlsd.algorithms import make_loss_mode  # noqa: E402
from megatron_rlsd.build import build  # noqa: E402
from megatron_rlsd.config import load_config  # noqa: E402
from megatron_rlsd.optimizer import reset_moments  # noqa: E402
from megatron_rlsd.parallel import all_reduce_scalar, init_distributed  # noqa: E402
from megatron_rlsd.trainer import Trainer  # noqa: E402

MODES = ("rlsd", "grpo", "opsd", "grpo_opsd", "sdpo", "rlrt", "antisd", "egrsd")
LEAK = " But wait, the reference solution says otherwise."


def record_calls(targets) -> list[str]:
    """Wrap the named methods of each object to record the order of the calls."""
    events = []
    for obj, names in targets:
        for name in names:
            original = getattr(obj, name)

            def recorded(*args, _name=name, _original=original, **kwargs):
                events.append(_name)
                return _original(*args, **kwargs)

            setattr(obj, name, recorded)
    return events


def weights(trainer):
    return [p.detach().clone() for p in trainer.module.parameters()]


def plant_solutions(trainer, samples, mine):
    """Sample 0 of every group (where this rank generated it) becomes the row's ideal response."""
    tok = trainer.c.tokenizer
    for i in mine:
        s = samples[i]
        if i % trainer.cfg.rollout.group_size == 0:
            s.response = tok(s.row.solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
            s.rollout_logprobs = [0.0] * len(s.response)
            s.text = tok.decode(s.response, skip_special_tokens=True)
            if i == 0:  # one leak per step: the metric's text, not the tokens
                s.text += LEAK


def against_gradient(trainer, before) -> dict:
    """Per element: the step moved every weight against its (clipped) gradient, or not at all."""
    agree = moved = 0
    dot = 0.0
    for p, b in zip(trainer.module.parameters(), before):
        dw, g = p.detach() - b, p.main_grad
        agree += int(((dw * g) > 0).sum())  # moved along the gradient: wrong
        moved += int((dw != 0).sum())
        dot += float((dw * g).sum())
    return {"moved_with_gradient": int(all_reduce_scalar(agree)), "moved": int(all_reduce_scalar(moved)),
            "dot": all_reduce_scalar(dot)}  # fmt: skip


def entropy_median_check(trainer, samples) -> dict:
    """The trainer's median teacher entropy (tensor gather over the last stage's DP group, a world
    max to every stage) against Python's statistics.median of every last-stage rank's tokens
    (object gather over the world)."""
    import statistics

    batch = trainer.local_batch(samples)
    teacher = trainer.score_teacher(batch)
    got = trainer.teacher_entropy_median(batch, teacher)
    mine = []
    if teacher is not None and ps.get_tensor_model_parallel_rank() == 0:  # one copy per DP slice
        for i, s in enumerate(batch):
            mine += teacher["entropy"][i, : len(s.response)].double().tolist()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (got, mine))
    return {"values": [p[0] for p in parts], "reference": statistics.median(v for p in parts for v in p[1])}


def main(report_path, *overrides):
    cfg = load_config("examples/tiny_cpu.yaml", list(overrides))
    platform = init_distributed(cfg.parallel)
    demo.prepare(cfg)
    trainer = Trainer(cfg, build(cfg, platform))
    buckets = []
    sync = trainer.c.engine.update_weights

    def recording_sync(it):
        def record():
            for bucket in it:
                buckets.append(sum(t.numel() * t.element_size() for _, t in bucket))
                yield bucket

        sync(record())

    trainer.c.engine.update_weights = recording_sync
    trainer.start()  # warm start, first sync
    report = {"temperature": trainer.temperature, "modes": {}, "teacher": []}
    events = record_calls([(trainer.c.engine, ("generate", "sleep", "update_weights")),
                           (trainer.offloader, ("for_rollout", "for_training")),
                           (trainer.c.optimizer, ("step_with_ready_grads",))])  # fmt: skip
    row = trainer.train_step()
    report["phase_order"] = list(events)  # the recording goes on
    report["plain_step"] = {k: row[k] for k in ("train_rollout_logp_maxdiff", "train_rollout_logp_diff", "reward", "grad_norm")}
    report["buckets"] = {"count_per_sync": len(buckets) // 2, "max_bytes": max(buckets), "cap": cfg.rollout.weight_bucket_mb << 20}
    # the per-mode checks read the gradients after the step: keep the grad buffers (and optimizer
    # state) in place from here on (offloaded grads have no storage)
    trainer.offloader.for_training()
    trainer.offloader.cfg = dataclasses.replace(cfg.offload, grads=False, optimizer=False)

    for mode in MODES:
        cfg.algorithm.loss_mode = mode
        trainer.mode = make_loss_mode(cfg.algorithm, cfg.rollout.truncated_is_cap)
        if mode == "antisd":  # calibrated and open (H_warm 0: it stays open)
            trainer.mode.gate.load_state_dict({"warm": [0.0], "h_warm": 0.0, "open": True})
        reset_moments(trainer.c.optimizer)
        samples, mine = trainer.generate_rollouts(trainer.next_prompts())
        plant_solutions(trainer, samples, mine)
        before = weights(trainer)
        row = trainer.learn_from(samples, mine)
        keys = ("loss", "grad_norm", "update_ok", "accuracy", "pg_tis_weight", "lambda", "leakage", "opsd_context_fallback",
                "clip_low", "clip_high", "reweighted", "sign_flipped", "antisd_term", "gate_open", "gated")  # fmt: skip
        report["modes"][mode] = {k: row.get(k) for k in keys} | {"samples": len(samples)}
        teacher_text = trainer.c.tokenizer.decode(samples[0].teacher_prompt)
        report["modes"][mode]["teacher_reads"] = [what for what, text in (("solution", samples[0].row.solution),
                                                  ("answer", samples[0].row.answer)) if text in teacher_text]  # fmt: skip
        report["modes"][mode] |= against_gradient(trainer, before)
        if mode == "antisd":
            report["entropy_median"] = entropy_median_check(trainer, samples)
        in_sync = all(torch.equal(t, p) for t, p in zip(trainer.teacher.weights, trainer.module.parameters()))
        report["teacher"].append({"step": trainer.step, "age": trainer.teacher.age, "equals_policy": in_sync})

    cfg.algorithm.loss_mode = "rlsd"
    trainer.mode = make_loss_mode(cfg.algorithm, cfg.rollout.truncated_is_cap)
    trainer.save_checkpoint()
    good_step, saved = trainer.step, weights(trainer)
    trainer.faults.nan_steps = {good_step + i for i in (1, 2, 3)}
    cfg.trainer.max_consecutive_nonfinite = 2
    row = trainer.train_step()
    report["nan"] = {"update_ok": row["update_ok"], "skipped": row["nonfinite_skipped"],
                     "weights_unchanged": all(torch.equal(a, b) for a, b in zip(weights(trainer), saved))}  # fmt: skip
    try:
        trainer.train_step()
        report["nan"]["abort"] = None
    except RuntimeError as e:
        report["nan"]["abort"] = str(e)
    latest = (trainer.checkpointer.root / "latest").read_text().strip()
    for p in trainer.module.parameters():
        p.data.zero_()
    state = trainer.checkpointer.load()
    report["nan"] |= {"latest_is_last_good": latest == f"step_{good_step:07d}", "loaded_step": state["step"],
                      "loaded_weights_equal_saved": all(torch.equal(a, b) for a, b in zip(weights(trainer), saved))}  # fmt: skip
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))
    trainer.close()
    trainer.c.engine.close()  # also tears down torch.distributed (vLLM's cleanup)


if __name__ == "__main__":
    main(*sys.argv[1:])
