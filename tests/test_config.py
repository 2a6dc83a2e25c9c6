"""Typed YAML configs with dotted overrides; the example recipes carry the paper's values."""

import pytest

from megatron_rlsd.config import ConfigError, load_config


def test_overrides_and_types(tmp_path, tiny_qwen3):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "problem": "What is 1 + 1?", "answer": "2"}\n')
    base = [f"model.hf_dir={tiny_qwen3['untied']}", "demo.tiny_model=", f"data.train_file={data}", "demo.synthetic_task="]
    cfg = load_config("examples/tiny_cpu.yaml", base + ["trainer.steps=7", "optim.lr=1e-3", "parallel.tensor_model_parallel_size=1"])
    assert cfg.trainer.steps == 7 and cfg.optim.lr == 1e-3 and cfg.parallel.tensor_model_parallel_size == 1
    assert cfg.algorithm.loss_mode == "rlsd"
    with pytest.raises(ConfigError, match="must be a number"):
        load_config("examples/tiny_cpu.yaml", base + ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="unknown config key algorithm.lamda_init"):
        load_config("examples/tiny_cpu.yaml", base + ["algorithm.lamda_init=0.3"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("examples/tiny_cpu.yaml", base + ["trainer.steps"])
    with pytest.raises(ConfigError, match="config file .* not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="eps_w must be in"):
        load_config("examples/tiny_cpu.yaml", base + ["algorithm.eps_w=1.5"])
    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size must be >= 1"):
        load_config("examples/tiny_cpu.yaml", base + ["parallel.tensor_model_parallel_size=0"])
    with pytest.raises(ConfigError, match="algorithm.teacher_ema_rate must be in"):
        load_config("examples/tiny_cpu.yaml", base + ["algorithm.teacher_ema_rate=1.0"])
    with pytest.raises(ConfigError, match="demo.tiny_model must be"):
        load_config("examples/tiny_cpu.yaml", base + ["demo.tiny_model=big"])
    # the credit family's options
    with pytest.raises(ConfigError, match=r"eps_w must be in \(0, 1\) \(rlrt: \(0, 1\]\)"):
        load_config("examples/tiny_cpu.yaml", base + ["algorithm.eps_w=1.0"])
    assert load_config("examples/tiny_cpu.yaml", base + ["algorithm.loss_mode=rlrt", "algorithm.eps_w=1.0"]).algorithm.eps_w == 1.0
    for bad, message in (("algorithm.antisd_warmup_steps=0", "antisd_warmup_steps >= 1"),
                         ("algorithm.egrsd_floor=0", "egrsd_floor must be in"),
                         ("algorithm.opsd_context=trace", "opsd_context must be solution or answer"),
                         ("trainer.leakage_patterns=['(x']", "leakage_patterns: leakage pattern '\\(x' is not a valid"),
                         ("trainer.leakage_patterns=reference", "trainer.leakage_patterns must be a list")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config("examples/tiny_cpu.yaml", base + [bad])
    cfg = load_config("examples/tiny_cpu.yaml", base + ["trainer.leakage_patterns=['hint', 'peek']"])
    assert cfg.trainer.leakage_patterns == ["hint", "peek"] and load_config(
        "examples/tiny_cpu.yaml", base + ["trainer.leakage_patterns=[]"]).trainer.leakage_patterns == []


@pytest.mark.parametrize("recipe", ["qwen3vl_8b_rlsd", "qwen3_8b_rlsd"])
def test_8b_recipes_have_the_papers_hyperparameters(tmp_path, tiny_qwen3, recipe):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "problem": "p", "answer": "2"}\n')
    cfg = load_config(f"examples/{recipe}.yaml", [f"model.hf_dir={tiny_qwen3['untied']}", f"data.train_file={data}"])
    a, r, o, t = cfg.algorithm, cfg.rollout, cfg.optim, cfg.trainer
    assert (o.lr, o.weight_decay, o.grad_clip) == (1e-6, 0.01, 1.0)
    assert (t.prompts_per_step, r.group_size, r.temperature) == (256, 8, 1.0)
    assert (cfg.data.max_prompt_tokens, r.max_new_tokens) == (4096, 4096)
    assert (a.eps_low, a.eps_high, a.eps_w) == (0.2, 0.28, 0.2)
    assert (a.lambda_init, a.lambda_decay_steps, a.teacher_refresh_interval) == (0.5, 50, 10)
    assert a.loss_mode == "rlsd" and cfg.model.params_dtype == "bfloat16"
