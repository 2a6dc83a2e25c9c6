"""Device placement is designed, not assumed: batches cross to the model's device at one seam,
and scalar collectives use the backend's device (NCCL takes CUDA tensors only).

The CPU platform layer maps "cuda" allocations to the host, so a CPU run cannot see a tensor left
on the wrong device. tests/workers/device_seam.py puts the model on PyTorch's `meta` device
instead, where mixing in a host tensor fails, and drives the trainer's scoring passes and the
update's loss for every loss mode.
"""

import json

import torch
import torch.distributed as dist
from conftest import torchrun

from megatron_rlsd.data.synthetic import make_synthetic_rows, write_jsonl
from megatron_rlsd.models.tiny import build_tiny_qwen3


def test_every_tensor_reaching_the_model_or_the_loss_is_on_the_models_device(tmp_path):
    hf = build_tiny_qwen3(tmp_path / "tiny", num_heads=4, num_kv_heads=2, seed=3)
    data = write_jsonl(make_synthetic_rows(16, seed=1), tmp_path / "add.jsonl")
    torchrun("tests/workers/device_seam.py", str(tmp_path / "report.json"), str(hf), str(data), str(tmp_path / "out"), nproc=1)
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report))
    assert set(report) == {"rlsd", "grpo", "opsd", "grpo_opsd", "sdpo", "rlrt", "antisd", "egrsd"}
    for mode, r in report.items():
        # scores, credit, losses and metric partials all on the model's device ...
        assert r["devices"] == ["meta"] and r["n_tensors"] >= 20, (mode, r)
        # ... while micro-batches are built on the host (tokens; with a teacher pass they also carry
        # its scores, on the device): the seam moved them
        assert r["micro_batch_devices"] == (["cpu"] if mode == "grpo" else ["cpu", "meta"]), (mode, r)


def test_scalar_collectives_use_the_backends_device(monkeypatch):
    from megatron_rlsd import parallel

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert parallel.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert parallel.collective_device() == torch.device("cpu")
    seen = []
    monkeypatch.setattr(parallel, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append(t.device))
    try:
        parallel.all_reduce_scalar(1.0)
    except RuntimeError:  # reading a meta tensor back fails; the collective itself already ran
        pass
    assert seen == [torch.device("meta")]
