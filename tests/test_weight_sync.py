"""Megatron (TP2PP2) -> vLLM weight sync: every colocated engine matches Megatron's log-probs."""

import json

from conftest import run_tool, torchrun


def test_vllm_matches_megatron_after_each_sync(tiny_qwen3, tmp_path):
    run_tool("convert_hf_to_megatron", "--hf-dir", str(tiny_qwen3["untied"]), "--out", str(tmp_path / "ckpt"), "--quiet")
    torchrun("tests/workers/weight_sync.py", str(tmp_path / "ckpt"), str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report))
    assert report["buckets"] == 4 + 3  # 0 MB buckets: one per layer + embedding, final norm, lm_head
    assert report["stale_diff"] > 0.1  # engines start from dummy weights: the sync is what fixes them
    assert len(report["synced_diff_per_rank"]) == 4
    assert max(report["synced_diff_per_rank"]) <= 1e-4
    assert report["changed_by_second_update"] > 0.1  # the second update really changed the model ...
    assert max(report["second_sync_diff_per_rank"]) <= 1e-4  # ... and every engine followed
