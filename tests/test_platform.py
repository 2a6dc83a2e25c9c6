"""Platform selection, the CPU layer's guards (in a fresh process), and parallel-layout validation."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from megatron_rlsd import platform as plat
from megatron_rlsd.models.qwen3 import Qwen3Shape
from megatron_rlsd.parallel import ParallelConfig


def test_select_platform_picks_gloo_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plat.select_platform() == plat.Platform("cpu", "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plat.select_platform() == plat.Platform("cuda", "nccl")
    assert plat.select_platform(force_cpu=True).backend == "gloo"


# Run in a fresh interpreter: the conversion tools run inside the pytest process (tests/conftest.py:
# run_tool) and apply the CPU layer there, as the trainer does in its own processes.
_REFUSALS = """
import pytest, torch
from megatron.core import package_info
from megatron_rlsd import platform as plat

assert not plat.cpu_layer_applied()
torch.cuda.is_available = lambda: True
with pytest.raises(RuntimeError, match="without CUDA"):
    plat.apply_cpu_layer()
torch.cuda.is_available = lambda: False
package_info.__version__ = "0.17.0"
with pytest.raises(RuntimeError, match=r"supports megatron-core 0\\.16\\.x, found 0\\.17\\.0"):
    plat.apply_cpu_layer()
assert not plat.cpu_layer_applied()
print("refused both")
"""


def test_cpu_layer_refuses_cuda_machines_and_other_mcore_versions():
    proc = subprocess.run([sys.executable, "-c", _REFUSALS], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert proc.returncode == 0 and "refused both" in proc.stdout, proc.stderr[-3000:]


def test_parallel_config_validation():
    with pytest.raises(ValueError, match="not divisible by TP\\*PP = 2\\*2; launch a multiple of 4"):
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(6)
    assert ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(8) == 4
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be >= 1"):
        ParallelConfig(tensor_model_parallel_size=0)
    # what the trainer does not implement is refused, not accepted
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size is not implemented"):
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="context_parallel_size > 1 is not implemented"):
        ParallelConfig(context_parallel_size=2)


def test_model_shape_refuses_splits_it_cannot_make(tiny_qwen3):
    import json

    shape = Qwen3Shape.from_hf_config(json.loads((tiny_qwen3["untied"] / "config.json").read_text()))
    assert (shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim) == (8, 4, 32)
    assert shape.rope_theta == 1e6
    shape.check_parallel(4, 2)
    with pytest.raises(ValueError, match="does not divide num_key_value_heads=4"):
        shape.check_parallel(8, 1)
    with pytest.raises(ValueError, match="pipeline parallel size 3 does not divide num_hidden_layers=4"):
        shape.check_parallel(1, 3)


def test_transformer_impl_is_chosen_explicitly_and_never_falls_back(monkeypatch):
    """On GPU the Transformer Engine spec is used or the run refuses with one line naming the fix;
    `local` is an explicit choice, never a silent fall-back."""
    from megatron_rlsd.models import qwen3
    from megatron_rlsd.models.registry import use_transformer_engine

    cpu, gpu = plat.Platform("cpu", "gloo"), plat.Platform("cuda", "nccl")
    assert use_transformer_engine("auto", cpu) is False and use_transformer_engine("local", gpu) is False
    with pytest.raises(ValueError, match="transformer_impl=te needs CUDA"):
        use_transformer_engine("te", cpu)
    with pytest.raises(ValueError, match="transformer_impl must be one of"):
        use_transformer_engine("apex", gpu)
    monkeypatch.setattr(qwen3, "transformer_engine_import_error", lambda: "ImportError: libtransformer_engine.so")
    for impl in ("auto", "te"):
        with pytest.raises(ValueError, match=r"Transformer Engine does not import \(ImportError: libtransformer_engine.so\); "
                                             r"install it with `bash tools/setup_env.sh gpu`.*model.transformer_impl=local"):
            use_transformer_engine(impl, gpu)
    monkeypatch.setattr(qwen3, "transformer_engine_import_error", lambda: None)
    assert use_transformer_engine("auto", gpu) is True and use_transformer_engine("te", gpu) is True


def test_distributed_optimizer_only_with_an_adam_whose_checkpoints_reload(monkeypatch):
    """optim.distributed: auto is the distributed optimizer on GPU with Transformer Engine's or
    Apex's Adam, the plain one otherwise; forcing it on with torch's Adam is refused."""
    from megatron.core.optimizer import distrib_optimizer

    from megatron_rlsd.build import use_distributed_optimizer
    from megatron_rlsd.config import ConfigError

    cpu, gpu = plat.Platform("cpu", "gloo"), plat.Platform("cuda", "nccl")
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    assert use_distributed_optimizer(None, gpu) is True and use_distributed_optimizer(None, cpu) is False
    assert use_distributed_optimizer(False, gpu) is False
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)  # torch's Adam
    assert use_distributed_optimizer(None, gpu) is False
    with pytest.raises(ConfigError, match="optim.distributed=true needs Transformer Engine's or Apex's Adam"):
        use_distributed_optimizer(True, gpu)
