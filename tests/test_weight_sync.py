"""Megatron (TP2PP2) -> vLLM weight sync: every colocated engine matches Megatron's log-probs, and
vLLM's log goes to the shared file, not to the console."""

import json
import re

from conftest import run_tool, torchrun

# the engine's log format: "<date> <time> rank <r> <LEVEL> <logger>: <message>"
LOG_LINE = re.compile(r"^\S+ \S+ rank (\d+) ([A-Z]+) (vllm[\w.]*): (.*)$")


def test_vllm_matches_megatron_after_each_sync(tiny_qwen3, tmp_path):
    run_tool("convert_hf_to_megatron", "--hf-dir", str(tiny_qwen3["untied"]), "--out", str(tmp_path / "ckpt"), "--quiet")
    log = tmp_path / "logs" / "vllm.log"
    proc = torchrun("tests/workers/weight_sync.py", str(tmp_path / "ckpt"), str(tmp_path / "report.json"), str(log))
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report))
    assert report["buckets"] == 4 + 3  # 0 MB buckets: one per layer + embedding, final norm, lm_head
    # each layer is written once into the tensors handed over, and only after the previous bucket
    # was handed over: at every handover, and at the end, all the sync has allocated beyond what
    # it handed over is one scratch TP shard (no list of shards, no concatenation, no flattened
    # copy, no look-ahead layer)
    for r in report["sync_memory_per_rank"]:
        *handovers, (never_handed, _) = r["held"]
        assert len(handovers) == 7
        for pending, bucket in handovers:
            assert 0 < bucket and 0 <= pending <= r["largest_shard"], r
        assert 0 < never_handed <= r["largest_shard"], r
    assert report["stale_diff"] > 0.1  # engines start from dummy weights: the sync is what fixes them
    assert len(report["synced_diff_per_rank"]) == 4
    assert max(report["synced_diff_per_rank"]) <= 2e-5  # measured 1.9e-6
    assert "asleep" in report["asleep_refusal"]  # no requests between sleep() and update_weights()
    assert report["changed_by_second_update"] > 0.1  # the second update really changed the model ...
    assert max(report["second_sync_diff_per_rank"]) <= 2e-5  # ... and every engine followed (1.9e-6)

    records = [m.groups() for line in log.read_text().splitlines() if (m := LOG_LINE.match(line))]
    assert {r for r, *_ in records} == {"0", "1", "2", "3"}  # one file shared by the four engines
    assert {level for _, level, *_ in records} <= {"WARNING", "ERROR", "CRITICAL"}  # the default level
    assert not [r for r in records if r[1] in ("ERROR", "CRITICAL")]
    messages = {msg for *_, msg in records}
    # the two syncs (7 buckets, then 1) were complete: no layer or weight reported as not loaded,
    # and no false alarm for RotaryEmbedding's config-derived cache
    assert not [m for m in messages if "Failed to load weights" in m or "were not loaded" in m]
    console = proc.stdout + proc.stderr
    assert not [m for m in messages if m in console]  # nothing vLLM logged reached the console
