"""VLLMEngine's contract with vLLM, in-process and without vLLM: a recording stand-in for
`vllm.LLM` checks the order and tags of the sleep/wake/reload calls (GPU and CPU paths), the
engine arguments, and where vLLM's log records go."""

import dataclasses
import logging
import sys
import types

import pytest
import torch

from megatron_rlsd.config import RolloutConfig
from megatron_rlsd.platform import Platform
from megatron_rlsd.rollout import vllm_engine
from megatron_rlsd.rollout.vllm_engine import VLLMEngine

GPU, CPU = Platform("cuda", "nccl"), Platform("cpu", "gloo")


class _Rotary(torch.nn.Module):  # only a config-derived, non-persistent buffer (like vLLM's RotaryEmbedding)
    def __init__(self):
        super().__init__()
        self.register_buffer("cos_sin_cache", torch.zeros(4), persistent=False)


class _Stats(torch.nn.Module):  # a persistent buffer: a checkpoint can hold it
    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4))


class FakeLLM:
    """Records every call the engine makes into the shared `calls` list."""

    calls: list = []
    multimodal = False

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        rec = self.calls.append
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(is_multimodal_model=self.multimodal, hf_config=types.SimpleNamespace()),
            reset_encoder_cache=lambda: rec(("reset_encoder_cache",)),
            engine_core=types.SimpleNamespace(shutdown=lambda: rec(("shutdown",))),
        )
        model = torch.nn.ModuleDict({"rotary": _Rotary(), "stats": _Stats(), "proj": torch.nn.Linear(2, 2)})
        self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(get_model=lambda: model))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if callable(method):  # runs on the worker
            return [method(self.worker)]
        self.calls.append(("collective_rpc", method))
        for name, tensor in kwargs["weights_iterator"]:  # consumed as vLLM does: one tensor at a time
            self.calls.append(("load", name, tensor.item()))
        return [None]

    def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))
        return True

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append(("generate", len(requests)))
        lp = types.SimpleNamespace(logprob=-0.5)
        out = types.SimpleNamespace(token_ids=[7], logprobs=[{7: lp}], finish_reason="stop")
        return [types.SimpleNamespace(outputs=[out], prompt_token_ids=r["prompt_token_ids"]) for r in requests]


@dataclasses.dataclass
class FakeLoggingConfig:
    configure_logging: bool = True
    pylogging_config_file: str | None = None


@pytest.fixture
def make_engine(monkeypatch, tmp_path):
    """Builds engines over FakeLLM; restores the process's logging state afterwards."""
    FakeLLM.calls = []
    monkeypatch.setattr(FakeLLM, "multimodal", False)
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM, fake_vllm.SamplingParams = FakeLLM, lambda **kw: kw
    fake_config = types.ModuleType("vllm.config")
    fake_config.LoggingConfig = FakeLoggingConfig
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setitem(sys.modules, "vllm.config", fake_config)
    monkeypatch.setattr(vllm_engine, "gc", types.SimpleNamespace(collect=lambda: FakeLLM.calls.append(("gc.collect",))))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: FakeLLM.calls.append(("cuda.empty_cache",)))
    loggers = [logging.getLogger(n) for n in ("vllm", "vllm.model_executor.model_loader.reload.layerwise")]
    saved = [(lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in loggers]
    engines = []

    def make(platform, cfg=None, log_file=None):
        engines.append(VLLMEngine(str(tmp_path / "hf"), cfg or RolloutConfig(), platform, max_model_len=64, seed=1,
                                  log_file=log_file))  # fmt: skip
        return engines[-1]

    yield make
    for lg, (handlers, filters, level, propagate) in zip(loggers, saved):
        for h in lg.handlers:
            if h not in handlers:
                h.close()
        lg.handlers[:], lg.filters[:], lg.level, lg.propagate = handlers, filters, level, propagate


def _buckets():
    """Two buckets, recording when each is produced (the engine must pull them lazily)."""
    FakeLLM.calls.append(("bucket", 0))
    yield [("a", torch.tensor(1.0)), ("b", torch.tensor(2.0))]
    FakeLLM.calls.append(("bucket", 1))
    yield [("c", torch.tensor(3.0))]


def _generate(engine):
    return engine.generate([[1, 2]], [0], temperature=0.7, top_p=1.0, max_new_tokens=4, stop_token_ids=[])


PUSH = [("collective_rpc", "reload_weights"), ("bucket", 0), ("load", "a", 1.0), ("load", "b", 2.0),
        ("bucket", 1), ("load", "c", 3.0), ("gc.collect",)]  # fmt: skip


def test_gpu_sleep_wake_order(make_engine):
    engine = make_engine(GPU)
    # first update, from the awake engine with its placeholder weights: sleep first (level 2)
    engine.update_weights(_buckets())
    assert FakeLLM.calls == [("sleep", 2), ("wake_up", ["weights"]), *PUSH, ("cuda.empty_cache",),
                             ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]  # fmt: skip
    FakeLLM.calls.clear()
    assert _generate(engine)[0].logprobs == [-0.5]
    engine.sleep()
    engine.sleep()  # already asleep: nothing more
    assert FakeLLM.calls == [("generate", 1), ("sleep", 2)]
    with pytest.raises(RuntimeError, match="asleep"):
        _generate(engine)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.score([[1, 2, 3]])
    FakeLLM.calls.clear()
    engine.update_weights(_buckets())  # after rollouts: asleep already
    assert FakeLLM.calls == [("wake_up", ["weights"]), *PUSH, ("cuda.empty_cache",), ("wake_up", ["kv_cache"]),
                             ("reset_prefix_cache",)]  # fmt: skip
    FakeLLM.calls.clear()
    _generate(engine)
    assert FakeLLM.calls == [("generate", 1)]


def test_multimodal_update_resets_encoder_cache(make_engine, monkeypatch):
    monkeypatch.setattr(FakeLLM, "multimodal", True)
    engine = make_engine(GPU)
    engine.sleep()
    FakeLLM.calls.clear()
    engine.update_weights(_buckets())
    assert FakeLLM.calls == [("wake_up", ["weights"]), *PUSH, ("cuda.empty_cache",), ("wake_up", ["kv_cache"]),
                             ("reset_prefix_cache",), ("reset_encoder_cache",)]  # fmt: skip


def test_cpu_skips_sleep_mode_but_keeps_the_contract(make_engine):
    engine = make_engine(CPU)
    engine.update_weights(_buckets())
    assert FakeLLM.calls == [*PUSH, ("reset_prefix_cache",)]
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        _generate(engine)
    FakeLLM.calls.clear()
    engine.update_weights(_buckets())
    _generate(engine)
    assert FakeLLM.calls == [*PUSH, ("reset_prefix_cache",), ("generate", 1)]
    engine.close()
    assert FakeLLM.calls[-1] == ("shutdown",)


def test_engine_arguments(make_engine):
    cfg = RolloutConfig(kv_cache_mb=48, gpu_memory_utilization=0.4)
    gpu, cpu = make_engine(GPU, cfg).llm.kwargs, make_engine(CPU, cfg).llm.kwargs
    for kw in (gpu, cpu):
        assert kw["logprobs_mode"] == "processed_logprobs"  # log-probs at the sampling temperature
        assert kw["logging_config"] == FakeLoggingConfig(configure_logging=False, pylogging_config_file=None)
        assert kw["distributed_executor_backend"] == "external_launcher" and kw["load_format"] == "dummy"
    assert gpu["enable_sleep_mode"] is True and gpu["gpu_memory_utilization"] == 0.4 and gpu["dtype"] == "bfloat16"
    assert "enable_sleep_mode" not in cpu and cpu["kv_cache_memory_bytes"] == 48 << 20 and cpu["dtype"] == "float32"


def test_vllm_log_goes_to_the_file_and_only_errors_to_the_console(make_engine, tmp_path, capsys):
    log = tmp_path / "out" / "vllm.log"
    cfg = RolloutConfig(vllm_log_level="info")
    make_engine(CPU, cfg, log_file=log)
    make_engine(CPU, cfg, log_file=log)  # a second engine in the process replaces the handlers
    child = logging.getLogger("vllm.some.module")
    child.debug("below the level")
    child.info("an info record")
    child.error("an error record")
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    for cls in ("_Rotary", "_Stats", "Linear"):
        reload_log.warning("%s: Failed to load weights", cls)
    text = log.read_text()
    assert "below the level" not in text
    assert text.count("rank 0 INFO vllm.some.module: an info record") == 1
    assert text.count("rank 0 ERROR vllm.some.module: an error record") == 1
    # the notice is dropped only for the module holding nothing loadable
    assert "_Rotary: Failed" not in text and "_Stats: Failed" in text and "Linear: Failed" in text
    err = capsys.readouterr().err
    assert "an error record" in err and "an info record" not in err and "Failed" not in err
    with pytest.raises(ValueError, match="rollout.vllm_log_level"):
        make_engine(CPU, RolloutConfig(vllm_log_level="LOUD"))


def test_without_a_file_only_errors_are_kept(make_engine, capsys):
    make_engine(CPU)
    logging.getLogger("vllm.x").warning("a warning")
    logging.getLogger("vllm.x").error("an error")
    err = capsys.readouterr().err
    assert "an error" in err and "a warning" not in err
    assert logging.getLogger("vllm").getEffectiveLevel() == logging.ERROR  # nothing else would be kept
