"""Megatron-Core Qwen3 equals HF transformers, at every TP/PP layout, through our converter.

One torchrun launch (4 gloo ranks) checks TP1PP1, TP2PP1, TP1PP2, TP2PP2 for tied and untied
embeddings, then saves at TP2PP2 and reloads at TP1PP1 and TP4PP1.
"""

import json

import torch
from safetensors.torch import load_file

from conftest import run_tool, torchrun

TOL = 1e-4


def test_megatron_matches_hf_at_all_layouts_and_reshards(tiny_qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokens = torch.randint(3, 600, (2, 24))
    torch.save(tokens, tmp_path / "tokens.pt")
    spec = {"models": []}
    for name, hf_dir in tiny_qwen3.items():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.save(model(tokens).logits, tmp_path / f"logits_{name}.pt")
        run_tool("convert_hf_to_megatron", "--hf-dir", str(hf_dir), "--out", str(tmp_path / f"ckpt_{name}"), "--quiet")
        spec["models"].append({
            "name": name, "ckpt": str(tmp_path / f"ckpt_{name}"),
            "hf_logits": str(tmp_path / f"logits_{name}.pt"), "tokens": str(tmp_path / "tokens.pt"),
        })  # fmt: skip
    resharded = tmp_path / "resharded"
    (resharded / "hf").mkdir(parents=True)
    for f in (tmp_path / "ckpt_untied" / "hf").iterdir():
        (resharded / "hf" / f.name).write_bytes(f.read_bytes())
    spec["reshard"] = {"ckpt": str(tmp_path / "ckpt_untied"), "save_to": str(resharded), "tokens": str(tmp_path / "tokens.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    torchrun("tests/workers/qwen3_parity.py", str(tmp_path / "spec.json"), str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report, indent=1))

    seen = {(r["model"], r["tp"], r["pp"]) for r in report["logits"]}
    assert seen == {(m, tp, pp) for m in ("tied", "untied") for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2))}
    for r in report["logits"]:
        assert r["max_abs_diff"] <= TOL, r

    # TP2PP2-saved weights reload at TP1PP1 / TP4PP1 with the same log-probs (TP only reorders
    # fp32 sums) ...
    assert {(r["tp"], r["pp"]) for r in report["reshard"]} == {(1, 1), (4, 1)}
    for r in report["reshard"]:
        assert r["max_abs_diff"] <= 1e-6, r
    # ... because the saved tensors are bit-identical to the HF originals.
    run_tool("convert_megatron_to_hf", "--ckpt", str(resharded), "--out", str(tmp_path / "hf_back"), "--quiet")
    original = load_file(tiny_qwen3["untied"] / "model.safetensors")
    back = load_file(tmp_path / "hf_back" / "model.safetensors")
    assert original.keys() == back.keys()
    for k in original:
        assert torch.equal(original[k], back[k]), k
