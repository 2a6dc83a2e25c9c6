"""The memory plan (megatron_rlsd/memory_plan.py, tools/plan_memory.py): exit codes and error lines,
the printed terms, monotonicity in every knob, the shipped recipes' headroom, docs/memory.md in
step with the tool, and the activation formulas against the measured peak memory of the real
Megatron model on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "examples" / "model_configs"
RECIPES = {"qwen3_8b_rlsd": "qwen3-8b", "qwen3vl_8b_rlsd": "qwen3vl-8b-instruct"}
CLUSTER = ["--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gib", "80"]

# The CPU measurement's model: a Qwen3 with GQA, its attention's s^2 term a minor part (a*s = 2048
# elements per token of ~17k per layer), fp32, the local spec.
MEASURED_HF = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 512, "num_attention_heads": 8,
               "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1536, "num_hidden_layers": 3,
               "vocab_size": 1024, "max_position_embeddings": 4096}  # fmt: skip
MEASURED_ROWS, MEASURED_SEQ = 4, 256
# A small Qwen3-VL (shape rules as the real one) whose parameters are counted against the plan's.
SMALL_VL = {"architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
            "text_config": {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                            "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 151936,
                            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [6, 5, 5],
                                                "rope_theta": 5e6}},
            "vision_config": {"depth": 3, "hidden_size": 64, "num_heads": 4, "intermediate_size": 96, "patch_size": 16,
                              "out_hidden_size": 128, "num_position_embeddings": 64,
                              "deepstack_visual_indexes": [0, 1]}}  # fmt: skip


def _tool():
    spec = importlib.util.spec_from_file_location("plan_memory", REPO / "tools" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "tools"))  # its _bootstrap import
    spec.loader.exec_module(module)
    return module


plan_memory = _tool()


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """plan_memory's exit code, stdout and stderr, run in this process."""
    try:
        code = plan_memory.main(list(argv))
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def recipe_plan(recipe: str, *overrides: str, nodes: int = 4, tmp: Path):
    """(config, MemoryPlan) of a shipped recipe on nodes x 8 GPUs of 80 GiB."""
    from megatron_rlsd.memory_plan import GIB, plan

    cfg, hf = plan_memory.load_for_planning(f"examples/{recipe}.yaml", list(overrides),
                                            str(MODEL_CONFIGS / RECIPES[recipe] / "config.json"), tmp)  # fmt: skip
    return cfg, plan(cfg, nodes * 8, 80 * GIB, hf)


def phase(result, name):
    return next(p for p in result.phases if p.name == name)


def term(ph, prefix: str) -> float:
    return next(t.bytes for t in ph.terms if t.name.startswith(prefix))


# ------------------------------------------------------------------------------------ the tool


def test_cli_prints_every_phase_and_exits_0_when_it_fits():
    """The shipped text recipe through the real command line (the other tests call main())."""
    proc = subprocess.run(
        [sys.executable, "tools/plan_memory.py", "--config", "examples/qwen3_8b_rlsd.yaml", *CLUSTER,
         "--model-config", str(MODEL_CONFIGS / "qwen3-8b" / "config.json")],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("rollout", "scoring", "update", "sync"):
        assert f"\n{name} " in proc.stdout
    assert proc.stdout.rstrip().endswith("every phase fits")


def test_exit_1_names_the_phase_and_the_knob(capsys, tmp_path):
    code, out, _ = run_main(capsys, "--config", "examples/qwen3_8b_rlsd.yaml", *CLUSTER, "--model-config",
                            str(MODEL_CONFIGS / "qwen3-8b" / "config.json"), "model.recompute=none",
                            "trainer.max_tokens_per_microbatch=0", "trainer.micro_batch_size=4")  # fmt: skip
    assert code == 1
    last = out.strip().splitlines()[-1]
    # 4 rows x 8192 tokens without recompute: ~99 GiB of stored activations alone
    assert last.startswith("update does not fit: ") and "GiB > 80.00 GiB; set model.recompute=full or " in last
    assert "trainer.max_tokens_per_microbatch=" in last
    # the knobs it names do make the update fit
    _, fixed = recipe_plan("qwen3_8b_rlsd", "model.recompute=full", "trainer.max_tokens_per_microbatch=0",
                           "trainer.micro_batch_size=4", tmp=tmp_path)  # fmt: skip
    assert fixed.fits(phase(fixed, "update"))


QWEN3 = ["--model-config", str(MODEL_CONFIGS / "qwen3-8b" / "config.json")]
TEXT = ["--config", "examples/qwen3_8b_rlsd.yaml"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "nope.yaml", *CLUSTER], "config file nope.yaml not found"),
        ([*TEXT, *CLUSTER, "--model-config", "nope.json"], "model config nope.json not found"),
        ([*TEXT, *CLUSTER], "model.hf_dir /models/Qwen3-8B: config.json not found; pass --model-config"),
        ([*TEXT, "--nodes", "0", "--gpus-per-node", "8", "--gpu-memory-gib", "80"],
         "argument --nodes: '0' must be > 0"),
        ([*TEXT, "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gib", "lots"],
         "argument --gpu-memory-gib: 'lots' is not a number"),
        ([*TEXT, "--nodes", "4", "--gpus-per-node", "3", "--gpu-memory-gib", "80", *QWEN3,
          "parallel.tensor_model_parallel_size=3"], "tensor parallel size 3 does not divide num_key_value_heads=8"),
        ([*TEXT, "--nodes", "1", "--gpus-per-node", "3", "--gpu-memory-gib", "80", *QWEN3],
         "world size 3 is not divisible by TP*PP = 2*1"),
        ([*TEXT, "--nodes", "5", "--gpus-per-node", "2", "--gpu-memory-gib", "80", *QWEN3,
          "parallel.pipeline_model_parallel_size=5"], "pipeline parallel size 5 does not divide num_hidden_layers=36"),
        ([*TEXT, *CLUSTER, *QWEN3, "trainer.max_token_per_microbatch=1"],
         "unknown config key trainer.max_token_per_microbatch"),
        ([*TEXT, *CLUSTER, *QWEN3, "model.recompute=some"], "model.recompute must be none, selective or full"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_exit_2(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("plan_memory: error: ") and message in err, err


def test_printed_terms_of_a_small_model(capsys, tmp_path):
    """A two-layer Qwen3 on 1 node x 2 GPUs (TP2): the printed weights, gradients, optimizer shard,
    teacher and vLLM share are the arithmetic of its parameter count."""
    hf = dict(MEASURED_HF, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    code, out, _ = run_main(capsys, "--config", "examples/tiny_cpu.yaml", "--nodes", "1", "--gpus-per-node", "2",
                            "--gpu-memory-gib", "8", "--model-config", str(tmp_path / "config.json"),
                            "model.params_dtype=bfloat16", "parallel.pipeline_model_parallel_size=1",
                            "trainer.prompts_per_step=8", "rollout.gpu_memory_utilization=0.5")  # fmt: skip
    assert code == 0, out
    h, q, k, f, v = 512, 512, 256, 1536, 1024
    split = 2 * (h * (q + 2 * k) + q * h + 3 * h * f) + 2 * v * h  # linears and the (untied) embeddings
    replicated = 2 * (2 * h + 2 * 64) + h  # layer norms, q/k norms; final norm
    per_rank = split / 2 + replicated  # TP2
    rollout = out.split("\nrollout")[1].split("\n\n")[0]
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731

    def printed(label):
        return next(line.split()[-1] for line in rollout.splitlines() if line.strip().startswith(label))

    assert printed("policy weights (bf16") == gib(per_rank * 2)
    assert printed("gradient buffer (fp32)") == gib(per_rank * 4)
    assert printed("optimizer shard") == gib(per_rank * 12 / 1)  # DP 1
    assert printed("teacher snapshot (bf16)") == gib(per_rank * 2)
    assert printed("vLLM share") == gib(0.5 * 8 * 2**30)
    assert "decoder activations stored (one micro-batch, recompute none)" in out


# ------------------------------------------------------------------------------------ the plan


def test_recompute_sequence_parallel_nodes_and_offload_move_the_right_terms(tmp_path):
    update = {}
    for mode in ("none", "selective", "full"):
        _, p = recipe_plan("qwen3_8b_rlsd", f"model.recompute={mode}", tmp=tmp_path)
        update[mode] = phase(p, "update")
    stored = {m: term(ph, "decoder activations stored") for m, ph in update.items()}
    assert stored["full"] < stored["selective"] < stored["none"]
    assert update["full"].total < update["selective"].total < update["none"].total

    for tp in (2, 4):
        knobs = (f"parallel.tensor_model_parallel_size={tp}", "model.recompute=selective")
        _, sp = recipe_plan("qwen3_8b_rlsd", "parallel.sequence_parallel=true", *knobs, tmp=tmp_path)
        _, no_sp = recipe_plan("qwen3_8b_rlsd", "parallel.sequence_parallel=false", *knobs, tmp=tmp_path)
        assert phase(sp, "update").total < phase(no_sp, "update").total
        # a forward keeps the gathered norm output whole: 2h/t + h against 2h, equal at TP2
        scoring_sp, scoring = phase(sp, "scoring").total, phase(no_sp, "scoring").total
        assert scoring_sp < scoring if tp > 2 else scoring_sp == scoring

    _, four = recipe_plan("qwen3_8b_rlsd", tmp=tmp_path)
    _, eight = recipe_plan("qwen3_8b_rlsd", nodes=8, tmp=tmp_path)
    shard = {nodes: term(phase(p, "update"), "optimizer shard") for nodes, p in ((4, four), (8, eight))}
    assert shard[8] == pytest.approx(shard[4] / 2)

    off = [f"offload.{what}=false" for what in ("grads", "optimizer", "teacher")]
    _, kept = recipe_plan("qwen3_8b_rlsd", *off, tmp=tmp_path)
    _, away = recipe_plan("qwen3_8b_rlsd", *[o.replace("false", "true") for o in off], tmp=tmp_path)
    r_kept, r_away = phase(kept, "rollout"), phase(away, "rollout")
    labels = ("gradient buffer", "optimizer shard", "teacher snapshot")
    moved = sum(term(r_kept, label) for label in labels)
    assert moved > 0 and all(term(r_away, label) == 0 for label in labels)
    assert r_away.total == pytest.approx(r_kept.total - moved)
    # grads and optimizer only leave for the rollout; the teacher lives on the host
    assert term(phase(away, "update"), "gradient buffer") == term(phase(kept, "update"), "gradient buffer") > 0
    assert term(phase(away, "update"), "teacher snapshot") == 0


def test_pipeline_stages_and_kv_cache_check(tmp_path):
    _, pp2 = recipe_plan("qwen3_8b_rlsd", "parallel.pipeline_model_parallel_size=2", tmp=tmp_path)
    _, pp1 = recipe_plan("qwen3_8b_rlsd", tmp=tmp_path)
    update = phase(pp2, "update")
    assert update.stage in ("first stage", "last stage")
    assert term(update, "policy weights") < term(phase(pp1, "update"), "policy weights")
    # 1F1B: the first stage holds PP micro-batches of its half of the layers, more than the last
    # stage's one micro-batch and logits
    _, selective = recipe_plan("qwen3_8b_rlsd", "parallel.pipeline_model_parallel_size=2", "model.recompute=selective",
                               tmp=tmp_path)  # fmt: skip
    first = phase(selective, "update")
    assert first.stage == "first stage"
    assert any(t.name.startswith("decoder activations stored (2 micro-batches in flight") for t in first.terms)

    _, small = recipe_plan("qwen3_8b_rlsd", "rollout.gpu_memory_utilization=0.2", tmp=tmp_path)
    rollout = phase(small, "rollout")
    assert not small.fits(rollout) and "cannot hold one sequence of 8192 tokens" in rollout.problem
    assert "rollout.gpu_memory_utilization=" in small.advice["rollout"]


def test_check_raises_one_line_or_returns_the_plan(tmp_path):
    from megatron_rlsd.memory_plan import GIB, check

    model_config = str(MODEL_CONFIGS / "qwen3vl-8b-instruct" / "config.json")
    cfg, hf = plan_memory.load_for_planning("examples/qwen3vl_8b_rlsd.yaml", [], model_config, tmp_path)
    assert [p.name for p in check(cfg, 32, 80 * GIB, hf).phases] == ["rollout", "scoring", "update", "sync"]
    with pytest.raises(ValueError) as err:
        check(cfg, 32, 40 * GIB, hf)
    line = str(err.value)
    assert "\n" not in line and " does not fit: " in line and "GiB > 40.00 GiB" in line and "; " in line


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_shipped_recipes_fit_4_nodes_of_8_gpus_with_headroom(tmp_path, recipe):
    from megatron_rlsd.memory_plan import HEADROOM_TARGET

    cfg, result = recipe_plan(recipe, tmp=tmp_path)
    # the paper's hyperparameters (tests/test_config.py checks the rest)
    assert (cfg.trainer.prompts_per_step, cfg.rollout.group_size, cfg.trainer.mini_batches_per_step) == (256, 8, 1)
    assert (cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens, cfg.optim.lr) == (4096, 4096, 1e-6)
    for ph in result.phases:
        assert result.fits(ph) and result.headroom(ph) >= HEADROOM_TARGET, (ph.name, result.report())


def test_docs_show_the_current_plan_of_both_recipes(capsys):
    doc = (REPO / "docs" / "memory.md").read_text()
    for recipe, model in RECIPES.items():
        code, out, _ = run_main(capsys, "--config", f"examples/{recipe}.yaml", *CLUSTER,
                                "--model-config", f"examples/model_configs/{model}/config.json")  # fmt: skip
        assert code == 0
        assert out.strip() in doc, f"docs/memory.md is stale for {recipe}: rerun tools/plan_memory.py and paste it"


# ------------------------------------------------------------------------------------ against a measurement


def test_activation_formulas_match_the_measured_peak_on_cpu(tmp_path):
    """Peak memory growth of the real Megatron model's training forward+backward (local spec,
    fp32, TP1 PP1, 1024 tokens), without and with full recompute, against the plan's update
    activations for the same shapes: stored + the larger of the loss and the layer moment."""
    from megatron_rlsd.memory_plan import Kernels, MicroBatch, Model, Recompute, Split, update_activations

    model = Model.from_hf_config(MEASURED_HF)
    tokens = MEASURED_ROWS * MEASURED_SEQ
    mb = MicroBatch(tokens=tokens, seq=MEASURED_SEQ, logit_rows=tokens)  # the loss reads every position
    kernels = Kernels.for_run("local", on_gpu=False)
    results = {}
    for mode in ("none", "full"):
        measured = _measure_in_subprocess(mode)
        # the parameter counts the plan's weights, gradients, optimizer and sync terms use
        assert measured["params"] == model.total_params
        assert measured["vl_params"] == Model.from_hf_config(SMALL_VL).total_params
        stored, loss, layer = update_activations(model, Split(1, False), kernels, 4, mb, Recompute(mode),
                                                 layers=model.decoder.layers)  # fmt: skip
        planned = sum(t.bytes for t in stored) + max(sum(t.bytes for t in loss), sum(t.bytes for t in layer))
        results[mode] = (measured["peak_growth"], planned)
    print({m: (round(a / 2**20, 1), round(p / 2**20, 1)) for m, (a, p) in results.items()})
    # measured / planned MiB: none 228.0 / 230.2 (+1%), full 91.4 / 100.1 (+10%)
    for mode, (actual, planned) in results.items():
        assert abs(planned - actual) / actual < 0.15, (mode, actual, planned)
    assert results["full"][0] < results["none"][0] / 2


def _measure_in_subprocess(recompute: str) -> dict:
    # a fixed mmap threshold makes every freed tensor leave the process, so RSS follows live memory
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__, recompute], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(recompute: str) -> dict:
    """(In a fresh process) peak RSS growth over one forward+backward of MEASURED_HF's model, read
    after every aten op, after a small warm-up step."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs
    from megatron_rlsd.models.forward import forward_backward
    from megatron_rlsd.models.registry import build_pipeline_stage
    from megatron_rlsd.parallel import ParallelConfig, init_distributed, seed_model_parallel_rng

    platform = init_distributed(ParallelConfig())
    seed_model_parallel_rng(0)
    vl_params = sum(p.numel() for p in build_pipeline_stage(SMALL_VL, platform)[0].parameters())
    model, _ = build_pipeline_stage(MEASURED_HF, platform)
    params = sum(p.numel() for p in model.parameters())
    if recompute == "full":  # Megatron's block-level recompute reads these at forward time
        config = model.config
        config.recompute_granularity, config.recompute_method, config.recompute_num_layers = "full", "uniform", 1
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)  # as build.build_model, on CPU
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync

    def batch(rows, seq):
        tokens = torch.randint(0, MEASURED_HF["vocab_size"], (rows, seq))
        return {"tokens": tokens, "resp_pos": torch.arange(seq).expand(rows, seq), "resp_ids": tokens}

    def loss_fn(logits, mb):
        # the model computed logits at `resp_pos` only (every position here)
        return -vocab_parallel_logprobs(logits, mb["resp_ids"]).mean(), {}

    page, statm = os.sysconf("SC_PAGE_SIZE"), open("/proc/self/statm")

    def rss() -> int:
        statm.seek(0)
        return int(statm.read().split()[1]) * page

    class PeakRss(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            PeakRss.peak = max(PeakRss.peak, rss())
            return out

    forward_backward(ddp, [batch(1, 32)], loss_fn)  # lazy allocations (kernel caches, rotary tables)
    measured = batch(MEASURED_ROWS, MEASURED_SEQ)
    base = rss()
    with PeakRss():
        forward_backward(ddp, [measured], loss_fn)
    return {"peak_growth": PeakRss.peak - base, "params": params, "vl_params": vl_params}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(_measure(sys.argv[1])))


def test_the_trainer_refuses_a_plan_that_cannot_fit_on_gpu(tmp_path, monkeypatch):
    """train.py's start-up guard: on a GPU whose memory the plan exceeds, one config error naming
    the phase and the knob, before anything is allocated; on CPU no check."""
    import shutil
    import types

    import torch

    from megatron_rlsd import platform, train
    from megatron_rlsd.config import ConfigError, load_config

    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(REPO / "examples/model_configs/qwen3-8b/config.json", hf / "config.json")
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "problem": "p", "answer": "2"}\n')
    cfg = load_config("examples/qwen3_8b_rlsd.yaml", [f"model.hf_dir={hf}", f"data.train_file={data}", "model.recompute=none",
                                                     "trainer.max_tokens_per_microbatch=0", "trainer.micro_batch_size=8"])  # fmt: skip
    train.check_memory_plan(cfg, 32)  # CPU here: nothing to check
    monkeypatch.setattr(platform, "select_platform", lambda force_cpu=None: platform.Platform("cuda", "nccl"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 << 30))
    with pytest.raises(ConfigError, match=r"memory plan: update does not fit: .* GiB > 80\.00 GiB; set .*model\.recompute"):
        train.check_memory_plan(cfg, 32)
    shipped = load_config("examples/qwen3_8b_rlsd.yaml", [f"model.hf_dir={hf}", f"data.train_file={data}"])
    train.check_memory_plan(shipped, 32)  # the recipe as shipped fits
