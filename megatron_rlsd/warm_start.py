"""Supervised warm start on the rows' reference solutions, before RL.

A tiny random model cannot write the answer format, so RL would see no reward variance and the
teacher would know no more than the student. A few supervised steps on the rows' `solution`
(the demo's synthetic rows carry the ideal response) fix both; half the examples carry the
teacher's privileged context so the model learns to read it. The update is the RL update
(optimizer.update) with the same optimizer at `trainer.warmup_sft_lr`; its moments are reset
afterwards so RL starts from fresh Adam statistics at its own learning rate.
"""

from __future__ import annotations

import random

from megatron.core import parallel_state as ps

from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs
from megatron_rlsd.build import Components
from megatron_rlsd.config import Config, ConfigError
from megatron_rlsd.optimizer import apply_hparams, reset_moments, update
from megatron_rlsd.parallel import all_reduce_scalar
from megatron_rlsd.rollout.samples import Sample, micro_batches, plan_micro_batches


def warm_start(c: Components, cfg: Config) -> None:
    steps = cfg.trainer.warmup_sft_steps
    missing = [r.id for r in c.rows if not r.solution]
    if missing:
        raise ConfigError(f"trainer.warmup_sft_steps={steps} needs a `solution` in every row; {len(missing)} lack one "
                          f"(first: {missing[0]}); set trainer.warmup_sft_steps=0")  # fmt: skip
    tok = c.tokenizer
    rng = random.Random(cfg.trainer.seed)
    tp_group = ps.get_tensor_model_parallel_group()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs_size = cfg.trainer.micro_batch_size
    batch = mbs_size * 2 * dp
    apply_hparams(c.optimizer, cfg.optim, lr=cfg.trainer.warmup_sft_lr)
    for step in range(1, steps + 1):
        rows = [c.rows[rng.randrange(len(c.rows))] for _ in range(batch)][dp_rank::dp]
        samples = []
        for i, row in enumerate(rows):
            messages = c.templates.teacher_messages(row) if i % 2 else c.templates.student_messages(row)
            prompt, vision = c.encoder.encode(messages, row.images)
            response = tok(row.solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
            samples.append(Sample(row=row, group=0, student_prompt=prompt, teacher_prompt=prompt, response=response, vision=vision))
        groups = plan_micro_batches([len(s.student_prompt) + len(s.response) for s in samples], mbs_size,
                                    cfg.trainer.max_tokens_per_microbatch)  # fmt: skip
        n_tokens = all_reduce_scalar(float(sum(len(s.response) for s in samples)), group=ps.get_data_parallel_group())

        def nll(logits, mb):
            lp = vocab_parallel_logprobs(logits, mb["resp_ids"], tp_group=tp_group)  # logits at resp_pos
            value = -(lp * mb["mask"]).sum() / n_tokens
            return value, {"nll": value.detach()}

        mbs = micro_batches(samples, groups, teacher=False, pad_id=tok.pad_token_id)
        reports, _ = update(c.model, c.optimizer, mbs, nll)
        if ps.is_pipeline_last_stage() and (step % 25 == 0 or step == steps):
            loss = all_reduce_scalar(sum(r["nll"].item() for r in reports), group=ps.get_data_parallel_group())
            if ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
                done = " (done)" if step == steps else ""
                print(f"warm start {step}/{steps}: nll/token {loss:.4f}{done}", flush=True)
    reset_moments(c.optimizer)
    apply_hparams(c.optimizer, cfg.optim)
