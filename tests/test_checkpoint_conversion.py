"""HF <-> Megatron conversion tools: bit-exact round trip, loadable export, streaming memory, and
one clear error line for every bad input."""

import json
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_tool


def _all_tensors(hf_dir):
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_round_trip_is_bit_exact_and_export_loads(tiny_qwen3, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_qwen3[name]
    run_tool("convert_hf_to_megatron", "--hf-dir", str(src), "--out", str(tmp_path / "ckpt"))
    # a small shard limit forces several shards + an index
    proc = run_tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf2"),
                    "--max-shard-gb", str(0.5 / 1024))  # fmt: skip
    assert "megatron->hf" in proc.stderr  # progress lines

    a, b = _all_tensors(src), _all_tensors(tmp_path / "hf2")
    if name == "tied":
        a.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(b)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf2")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = tok("Solve 12+7.", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert torch.equal(out, ref.generate(ids, max_new_tokens=6, do_sample=False))


def _peak_anon_rss(cmd) -> tuple[int, subprocess.CompletedProcess]:
    """Run `cmd`, sampling the child's anonymous resident memory; returns (peak bytes, proc)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    out, err = proc.communicate()
    t.join()
    assert proc.returncode == 0, err[-3000:]
    return peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_conversion_streams_instead_of_holding_the_model(tiny_qwen3, tmp_path):
    """Anonymous memory grows by far less than the model: tensors are memory-mapped."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=768, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512)  # fmt: skip
    big = tmp_path / "big"
    Qwen3ForCausalLM(cfg).save_pretrained(big)
    model_bytes = sum(t.numel() * t.element_size() for t in _all_tensors(big).values())
    assert model_bytes > 150 * 2**20

    tool = lambda name, *a: [sys.executable, str(REPO / "tools" / f"{name}.py"), *a, "--quiet"]  # noqa: E731
    base_in, _ = _peak_anon_rss(tool("convert_hf_to_megatron", "--hf-dir", str(tiny_qwen3["untied"]), "--out", str(tmp_path / "c0")))
    big_in, _ = _peak_anon_rss(tool("convert_hf_to_megatron", "--hf-dir", str(big), "--out", str(tmp_path / "c1")))
    base_out, _ = _peak_anon_rss(tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "c0"), "--out", str(tmp_path / "h0")))
    big_out, _ = _peak_anon_rss(tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "c1"), "--out", str(tmp_path / "h1"),
                                     "--max-shard-gb", "0.01"))  # fmt: skip
    print(f"model {model_bytes / 2**20:.0f} MiB; anon growth import {(big_in - base_in) / 2**20:.0f} MiB, "
          f"export {(big_out - base_out) / 2**20:.0f} MiB")  # fmt: skip
    assert big_in - base_in < 0.35 * model_bytes
    assert big_out - base_out < 0.35 * model_bytes
    a, b = _all_tensors(big), _all_tensors(tmp_path / "h1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if "error:" in l]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_bad_inputs_fail_with_one_clear_line(tiny_qwen3, tmp_path):
    src = tiny_qwen3["untied"]
    h2m = lambda hf, out, *a: run_tool("convert_hf_to_megatron", "--hf-dir", str(hf), "--out", str(out), *a, check=False)  # noqa: E731
    m2h = lambda ck, out: run_tool("convert_megatron_to_hf", "--ckpt", str(ck), "--out", str(out), check=False)  # noqa: E731

    assert "config.json" in _error_line(h2m(tmp_path / "nowhere", tmp_path / "o1"))

    no_weights = tmp_path / "no_weights"
    shutil.copytree(src, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    assert "no *.safetensors" in _error_line(h2m(no_weights, tmp_path / "o2"))

    unknown = tmp_path / "unknown"
    shutil.copytree(src, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"])))
    assert "unknown architecture 'LlamaForCausalLM'" in _error_line(h2m(unknown, tmp_path / "o3"))

    mismatch = tmp_path / "mismatch"
    shutil.copytree(src, mismatch)
    (mismatch / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=cfg["intermediate_size"] * 2)))
    assert "shape mismatch" in _error_line(h2m(mismatch, tmp_path / "o4"))

    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(src / "model.safetensors"), pickled / "pytorch_model.bin")
    assert "--allow-pickle" in _error_line(h2m(pickled, tmp_path / "o5"))
    assert h2m(pickled, tmp_path / "o6", "--allow-pickle").returncode == 0  # opt-in works

    h2m(src, tmp_path / "ok")
    assert "not empty" in _error_line(h2m(src, tmp_path / "ok"))
    assert "does not exist" in _error_line(m2h(tmp_path / "missing_ckpt", tmp_path / "o7"))
    assert "neither a checkpoint root" in _error_line(m2h(src, tmp_path / "o8"))
    assert "not empty" in _error_line(m2h(tmp_path / "ok", src))
