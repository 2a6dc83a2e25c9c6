"""Checkpoints do not depend on the layer spec: Qwen3 and Qwen3-VL (decoder, ViT, mergers) have the
same checkpoint tensors under the local and the Transformer Engine spec, and weights saved under
either load under the other (TP2, one torchrun launch; TE's modules are stand-ins, see the worker)."""

import json

from conftest import torchrun


def test_local_and_te_specs_share_checkpoints(tiny_qwen3, tmp_path):
    from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

    vl = build_tiny_qwen3_vl(tmp_path / "vl", num_layers=2, vision_depth=2)
    spec = {"models": {"qwen3": str(tiny_qwen3["untied"]), "qwen3_vl": str(vl)}, "scratch": str(tmp_path / "ckpt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun("tests/workers/layer_specs.py", str(tmp_path / "spec.json"), str(tmp_path / "report.json"), nproc=2)
    reports = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(reports, indent=1))
    assert len(reports) == 2  # one per TP rank
    for report in reports:
        assert report.keys() == {"qwen3", "qwen3_vl"}
        # checkpoint keys (a layer key holds all layers): embedding, 8 per decoder layer, final norm,
        # output layer
        assert report["qwen3"]["tensors"] == 1 + 8 + 2
        # ViT: patch embedding (2), position table, 12 per block, merger + 2 DeepStack mergers x 6
        assert report["qwen3_vl"]["vision_tensors"] == 2 + 1 + 12 + 3 * 6
        for name, r in report.items():
            assert r["tensors_only_local"] == r["tensors_only_te"] == r["tensor_layouts_differ"] == [], name
            assert r["objects_only_local"] == [], name
            # TE's norms keep FP8 metadata the local norms do not have: loads fill it in as "none"
            prefix = "language_model." if name == "qwen3_vl" else ""
            assert r["objects_only_te"] == sorted(
                [f"{prefix}decoder.final_layernorm._extra_state"]
                + [f"{prefix}decoder.layers.self_attention.{n}_layernorm._extra_state" for n in ("k", "q")]
            ), name
            assert r["differ_local_to_te"] == r["differ_te_to_local"] == [], name
