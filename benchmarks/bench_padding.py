"""padding: useful / computed tokens of the update and scoring passes, token-budget micro-batches
vs fixed-size padded micro-batches, on a length distribution like the paper's.

Lengths: prompts 200-4,096 tokens and responses 50-4,096 tokens, both log-normal with a long tail
(median prompt ~500, median response ~900, a few percent at the caps); the teacher's prompts are
the student's plus a reference answer of 50-1,024 tokens. A step is the recipe's 256 prompts x 8
samples split over 8 data-parallel ranks (256 rows a rank), grouped by the package's own function
(`rollout/samples.py: plan_micro_batches`, what `Trainer._groups` calls) with the recipe's knobs:
`trainer.micro_batch_size` 4 and `trainer.max_tokens_per_microbatch` 16,384
(examples/qwen3vl_8b_rlsd.yaml). Computed tokens = sum over micro-batches of rows x longest row
(each micro-batch is padded to its own longest row). Pure Python: no model runs.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import Check, Context, Result

PROMPTS, GROUP, DP = 256, 8, 8
MICRO_BATCH, TOKEN_BUDGET = 4, 16384


def paper_like_lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(student prompt, response, reference answer) lengths of n samples; a group's G samples
    share their prompt and reference answer."""
    groups = n // GROUP
    prompt = np.clip(rng.lognormal(np.log(500), 0.7, groups), 200, 4096).astype(int)
    ref = np.clip(rng.lognormal(np.log(200), 0.8, groups), 50, 1024).astype(int)
    resp = np.clip(rng.lognormal(np.log(900), 0.9, n), 50, 4096).astype(int)
    return np.repeat(prompt, GROUP), resp, np.repeat(ref, GROUP)


def run(ctx: Context) -> Result:
    from megatron_rlsd.rollout.samples import plan_micro_batches

    rng = np.random.default_rng(0)
    steps = 4 if ctx.quick else 32
    acc = ("update_budget", "update_fixed", "teacher_budget", "teacher_fixed")
    useful, computed = {k: 0 for k in acc}, {k: 0 for k in acc}
    mbs = {k: 0 for k in acc}
    for _ in range(steps):
        prompt, resp, ref = paper_like_lengths(PROMPTS * GROUP, rng)
        for rank in np.array_split(np.arange(PROMPTS * GROUP), DP):
            student = [int(prompt[i] + resp[i]) for i in rank]
            teacher = [int(prompt[i] + ref[i] + resp[i]) for i in rank]
            for key, lengths, budget in (("update_budget", student, TOKEN_BUDGET), ("update_fixed", student, 0),
                                         ("teacher_budget", teacher, TOKEN_BUDGET), ("teacher_fixed", teacher, 0)):  # fmt: skip
                groups = plan_micro_batches(lengths, MICRO_BATCH, budget)  # as Trainer._groups calls it
                useful[key] += sum(lengths)
                computed[key] += sum(len(g) * max(lengths[i] for i in g) for g in groups)
                mbs[key] += len(groups)
    eff = {k: useful[k] / computed[k] for k in acc}
    n_rank_steps = steps * DP
    details = [
        f"  padding: {steps} steps x {DP} ranks x {PROMPTS * GROUP // DP} rows; micro-batches per rank-step: "
        + ", ".join(f"{k} {mbs[k] / n_rank_steps:.1f}" for k in acc),
    ]
    figures = (f"update {eff['update_budget']:.3f} (fixed {MICRO_BATCH} rows: {eff['update_fixed']:.3f}), "
               f"teacher scoring {eff['teacher_budget']:.3f} (fixed: {eff['teacher_fixed']:.3f}), "
               f"budget {TOKEN_BUDGET} tokens")  # fmt: skip
    checks = [
        Check("update useful/computed", eff["update_budget"], ">=", 0.85),
        Check("scoring useful/computed", eff["teacher_budget"], ">=", 0.85),
    ]
    return Result("padding", figures, checks, details)
