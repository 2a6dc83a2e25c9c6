"""Building what the trainer runs on (model, optimizer, engine, data) and its checkpoints.

Kept apart from trainer.py so that the loop reads as the algorithm.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rlsd.checkpoint import dist as ckpt
from megatron_rlsd.config import Config
from megatron_rlsd.data import load_prompt_rows, make_synthetic_rows, write_jsonl


@dataclass
class Setup:
    platform: object
    model: object  # Megatron DDP-wrapped GPTModel stage
    shape: object
    optimizer: object
    tokenizer: object
    engine: object
    rows: list


def _prepare_files(cfg: Config) -> None:
    """Rank 0 materialises the embedded default's tiny model and synthetic data if asked."""
    if dist.get_rank() == 0:
        m, d = cfg.model, cfg.data
        if m.build_tiny and not (Path(m.hf_dir) / "config.json").is_file():
            from megatron_rlsd.models.tiny import build_tiny_qwen3

            build_tiny_qwen3(m.hf_dir, num_layers=m.tiny_layers, hidden_size=m.tiny_hidden, num_heads=m.tiny_heads,
                             num_kv_heads=m.tiny_kv_heads, intermediate_size=2 * m.tiny_hidden, seed=cfg.trainer.seed)  # fmt: skip
            print(f"built tiny Qwen3 in {m.hf_dir}", flush=True)
        if d.synthetic_task and not Path(d.train_file).is_file():
            rows = make_synthetic_rows(d.synthetic_rows, seed=d.seed, task=d.synthetic_task, max_operand=d.synthetic_max_operand)
            write_jsonl(rows, d.train_file)
            print(f"wrote {len(rows)} synthetic '{d.synthetic_task}' rows to {d.train_file}", flush=True)
    dist.barrier()


def build_optimizer(cfg: Config, model, lr: float):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optim
    bf16 = cfg.model.params_dtype == "bfloat16"
    oc = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        clip_grad=o.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=model.ddp_config.use_distributed_optimizer,
    )  # fmt: skip
    return get_megatron_optimizer(oc, [model])


def setup(cfg: Config) -> Setup:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from transformers import AutoTokenizer

    from megatron_rlsd.checkpoint.hf_load import load_hf_into_stage
    from megatron_rlsd.models.registry import build_pipeline_stage
    from megatron_rlsd.parallel import init_distributed, seed_model_parallel_rng
    from megatron_rlsd.rollout.vllm_engine import VLLMEngine
    from megatron_rlsd.trainer import seed_everything

    platform = init_distributed(cfg.parallel)
    seed_everything(cfg.trainer.seed)
    seed_model_parallel_rng(cfg.trainer.seed)
    _prepare_files(cfg)

    hf_config = json.loads((Path(cfg.model.hf_dir) / "config.json").read_text())
    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    model, shape = build_pipeline_stage(hf_config, platform, params_dtype=dtype, init_weights=False)
    if cfg.model.init_checkpoint:
        ckpt.load_model_weights(model, cfg.model.init_checkpoint)
    else:
        load_hf_into_stage(model, cfg.model.hf_dir, shape)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=not platform.is_cpu
    )  # the distributed optimizer's state does not restore exactly on CPU (PLATFORM.md)
    model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    optimizer = build_optimizer(cfg, model, cfg.optim.lr)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows, skipped = load_prompt_rows(cfg.data.train_file)
    if dist.get_rank() == 0 and skipped:
        print(f"data: skipped rows {dict(skipped)}", flush=True)

    engine = VLLMEngine(cfg.model.hf_dir, cfg.rollout, platform,
                        max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, seed=cfg.trainer.seed)  # fmt: skip
    seed_everything(cfg.trainer.seed)  # vLLM's CPU worker reseeds the global generators
    return Setup(platform, model, shape, optimizer, tokenizer, engine, rows)


# --------------------------------------------------------------------------------- warm start
def warm_start_sft(trainer) -> None:
    """A few supervised steps on ideal responses (synthetic tasks) so a tiny random model can
    produce the answer format and read its context at all; RL then has reward variance to work
    with and a teacher that knows more than the student."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs
    from megatron_rlsd.data import encode_prompt, sft_text
    from megatron_rlsd.rollout.samples import Sample, pack, response_logits
    from megatron_rlsd.models.forward import position_ids_for
    from megatron_rlsd.trainer import log0

    cfg, tok = trainer.cfg, trainer.tokenizer
    from megatron.core import parallel_state as ps

    optimizer = build_optimizer(cfg, trainer.model, cfg.trainer.warmup_sft_lr)
    rng = random.Random(cfg.trainer.seed)
    tp_group = ps.get_tensor_model_parallel_group()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = cfg.trainer.micro_batch_size * 2 * dp
    for step in range(cfg.trainer.warmup_sft_steps):
        rows = [trainer.rows[rng.randrange(len(trainer.rows))] for _ in range(batch)][dp_rank::dp]
        samples = []
        for i, row in enumerate(rows):
            # half the examples carry the teacher's privileged context, so the model learns to
            # read it (otherwise a tiny model's teacher is no better informed than its student)
            messages = trainer.templates.teacher_messages(row) if i % 2 else trainer.templates.student_messages(row)
            prompt = encode_prompt(tok, messages)
            response = tok(sft_text(row), add_special_tokens=False).input_ids + [tok.eos_token_id]
            samples.append(Sample(row=row, group=0, student_prompt=prompt, teacher_prompt=prompt, response=response))
        packed = pack(samples, teacher=False, pad_id=tok.pad_token_id)
        mbs = packed.micro_batches(cfg.trainer.micro_batch_size)
        n_tok = float(packed.mask.sum()) * dp

        def step_fn(data_iterator, model):
            mb = next(data_iterator)
            out = model(mb["tokens"], position_ids_for(mb["tokens"]), None)

            def loss(logits):
                lp = vocab_parallel_logprobs(response_logits(logits, mb["resp_pos"]), mb["resp_ids"], tp_group=tp_group)
                nll = -(lp * mb["mask"]).sum() / n_tok
                return nll * len(mbs) * dp, {"nll": nll.detach()}

            return out, loss

        trainer.model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(mbs), model=[trainer.model], num_microbatches=len(mbs),
            seq_length=packed.tokens.shape[1], micro_batch_size=cfg.trainer.micro_batch_size, forward_only=False,
        )  # fmt: skip
        optimizer.step()
        if reports and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0 and (step % 10 == 0 or step == cfg.trainer.warmup_sft_steps - 1):
            print(f"warm-start sft {step + 1}/{cfg.trainer.warmup_sft_steps} nll/token {sum(r['nll'].item() for r in reports) * dp:.3f}", flush=True)
    log0("warm-start done")
    # the teacher snapshot starts from the warmed-up policy
    if trainer.teacher.snapshot is not None:
        for s, p in zip(trainer.teacher.snapshot, trainer.module.parameters()):
            s.copy_(p.detach())


# --------------------------------------------------------------------------------- checkpoints
TEACHER_PREFIX = "teacher."


def _checkpoint_root(trainer) -> Path:
    return trainer.out_dir / "checkpoints"


def save_checkpoint(trainer) -> None:
    """Model, optimizer, teacher snapshot (dist_checkpointing) and trainer state.

    Crash-safe: everything is written into `.incomplete-step_N/`, which is renamed into place
    once complete; `latest` moves last; only the newest `trainer.keep_checkpoints` are kept."""
    root = _checkpoint_root(trainer)
    final = root / ckpt.step_dir_name(trainer.step)
    tmp = root / f".incomplete-{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf = root / ckpt.HF_SUBDIR
        if not hf.exists():
            from megatron_rlsd.checkpoint.convert import copy_side_files

            copy_side_files(Path(trainer.cfg.model.hf_dir), hf)
    dist.barrier()
    model_sd = trainer.module.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd),
        "trainer": {
            "step": trainer.step,
            "sampler": trainer.sampler.state_dict(),
            "teacher_age": trainer.teacher.age,
            "nonfinite_skipped": trainer.nonfinite_skipped,
        },
    }
    if trainer.teacher.snapshot is not None:
        with trainer.teacher_weights():  # the snapshot, under its own keys, reshardable like the model
            state["teacher"] = trainer.module.sharded_state_dict(prefix=TEACHER_PREFIX)
    ckpt.save_sharded(state, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        ckpt.publish_latest(root, final)
        for old in sorted(root.glob("step_*"))[: -trainer.cfg.trainer.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint {final}", flush=True)
    dist.barrier()


def load_checkpoint(trainer) -> bool:
    """Resume from the output directory's latest checkpoint if there is one."""
    root = _checkpoint_root(trainer)
    if not (root / ckpt.LATEST).is_file():
        return False
    step_dir = ckpt.resolve_step_dir(root)
    model_sd = trainer.module.sharded_state_dict()
    state = {"model": model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = ckpt.load_sharded(state, step_dir)
    trainer.module.load_state_dict(loaded["model"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    t = loaded["trainer"]  # common (non-sharded) state comes back merged into the result
    trainer.step = t["step"]
    trainer.sampler.load_state_dict(t["sampler"])
    trainer.teacher.age = t["teacher_age"]
    trainer.nonfinite_skipped = t.get("nonfinite_skipped", 0)
    if trainer.teacher.snapshot is not None:
        with trainer.teacher_weights():
            teacher = ckpt.load_sharded({"teacher": trainer.module.sharded_state_dict(prefix=TEACHER_PREFIX)}, step_dir)
            trainer.module.load_state_dict({k[len(TEACHER_PREFIX):]: v for k, v in teacher["teacher"].items()})
    if dist.get_rank() == 0:
        print(f"resumed from {step_dir} at step {trainer.step}", flush=True)
    return True
