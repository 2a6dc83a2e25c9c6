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

    if name == "untied":
        # Exporting in another dtype than the checkpoint's is read through dist_checkpointing (the
        # file-to-file copy needs the same bytes): values converted, layout the same.
        config = tmp_path / "ckpt" / "hf" / "config.json"
        config.write_text(json.dumps(dict(json.loads(config.read_text()), dtype="bfloat16")))
        run_tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf3"), "--quiet")
        c = _all_tensors(tmp_path / "hf3")
        assert c.keys() == a.keys() and all(torch.equal(c[k], a[k].to(torch.bfloat16)) for k in a)


def test_planned_writer_lays_out_shards_and_fills_them_in_place(tmp_path):
    """Shards and headers are planned up front; tensors (or a group's span) are filled in any
    order; the index marks a complete folder and safetensors reads every tensor back."""
    from megatron_rlsd.checkpoint.safetensors_io import INDEX_NAME, PlannedSafetensorsWriter

    g = torch.Generator().manual_seed(0)
    t = {name: torch.randn(shape, generator=g).to(torch.bfloat16)
         for name, shape in (("a", (3, 5)), ("gate", (4, 6)), ("up", (4, 6)), ("c", (7,)), ("d", (50, 2)))}  # fmt: skip
    spec = lambda *names: [(n, torch.bfloat16, tuple(t[n].shape)) for n in names]  # noqa: E731
    plan = [spec("a"), spec("gate", "up"), spec("c"), spec("d")]
    # 110 bytes: a (30) alone (gate+up, 96, is one group: never split), c (14) joins them, d (200) alone
    with PlannedSafetensorsWriter(tmp_path, plan, max_shard_bytes=110) as writer:
        writer.tensor("d").copy_(t["d"])
        writer.span(["gate", "up"]).copy_(torch.cat([t["gate"], t["up"]]).reshape(-1))
        writer.tensor("a").copy_(t["a"])
        writer.tensor("c").copy_(t["c"])
        with pytest.raises(ValueError, match="not consecutive"):
            writer.span(["a", "c"])
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"] == {"a": files[0], "gate": files[1], "up": files[1], "c": files[1], "d": files[2]}
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in t.values())
    for f in files:
        assert int.from_bytes((tmp_path / f).read_bytes()[:8], "little") % 8 == 0  # data starts aligned
    back = _all_tensors(tmp_path)
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)

    # A tensor never handed out: no index (the folder is not complete).
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="1 planned tensors were never written.*'c'"):
        with PlannedSafetensorsWriter(tmp_path / "x", [spec("a"), spec("c")]) as writer:
            writer.tensor("a").copy_(t["a"])
    assert not (tmp_path / "x" / INDEX_NAME).exists()


def _rss_anon(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _private_anon(pid: int) -> int:
    """Anonymous pages mapped by `pid` alone: what a forked child allocated or copied on write
    (per mapping, the smaller of Anonymous and Private_Dirty; file pages, even dirty ones, are not
    anonymous)."""
    total = dirty = 0
    try:
        for line in open(f"/proc/{pid}/smaps"):  # Private_Dirty precedes Anonymous in each mapping
            if line.startswith("Private_Dirty:"):
                dirty = int(line.split()[1])
            elif line.startswith("Anonymous:"):
                total += min(dirty, int(line.split()[1]))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total * 1024


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
    return children + [d for c in children for d in _descendants(c)]


def _anon_bytes(pid: int) -> int:
    """Anonymous memory of `pid` (RssAnon) plus what its descendants (the writer processes
    Megatron's save forks) added of their own. Pages a child still shares with its parent count
    once, so a sample that straddles a fork or an exit does not jump."""
    return _rss_anon(pid) + sum(_private_anon(c) for c in _descendants(pid))


def _peak_anon(cmd) -> int:
    """Run `cmd`, sampling the anonymous memory of its process tree; returns the peak in bytes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _anon_bytes(proc.pid))
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    _, err = proc.communicate()
    t.join()
    assert proc.returncode == 0, err[-3000:]
    return peak


def test_conversion_streams_one_layer_at_a_time(tiny_qwen3, tmp_path):
    """At the default shard size (4 GiB: the whole model would fit one shard), neither direction
    grows anonymous memory by more than a few layers, on a model of 12 layers of 12 MiB."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=768, hidden_size=512, intermediate_size=3584, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                      dtype="bfloat16")  # fmt: skip
    big = tmp_path / "big"
    Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(big)
    tensors = _all_tensors(big)
    model_bytes = sum(t.nbytes for t in tensors.values())
    layer_bytes = sum(t.nbytes for k, t in tensors.items() if k.startswith("model.layers.0."))
    assert layer_bytes < 0.1 * model_bytes

    tool = lambda name, *a: [sys.executable, str(REPO / "tools" / f"{name}.py"), *a, "--quiet"]  # noqa: E731
    tiny = tiny_qwen3["untied"]
    base_in = _peak_anon(tool("convert_hf_to_megatron", "--hf-dir", str(tiny), "--out", str(tmp_path / "c0")))
    big_in = _peak_anon(tool("convert_hf_to_megatron", "--hf-dir", str(big), "--out", str(tmp_path / "c1")))
    base_out = _peak_anon(tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "c0"), "--out", str(tmp_path / "h0")))
    big_out = _peak_anon(tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "c1"), "--out", str(tmp_path / "h1")))
    growth_in, growth_out = (big_in - base_in) / layer_bytes, (big_out - base_out) / layer_bytes
    print(f"model {model_bytes / 2**20:.0f} MiB, layer {layer_bytes / 2**20:.1f} MiB; anonymous memory growth: "
          f"import {growth_in:.1f} layers, export {growth_out:.1f} layers")  # fmt: skip
    # Measured: import 0.8-1.2 layers, export 0.2 (only fused QKV is read into memory); the export
    # before planned shards: 14 layers (the whole model is 12).
    assert growth_in < 2 and growth_out < 2
    index = json.loads((tmp_path / "h1" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: "model.safetensors" for k in tensors}  # one shard at the default size
    exported = _all_tensors(tmp_path / "h1")
    assert exported.keys() == tensors.keys() and all(torch.equal(tensors[k], exported[k]) for k in tensors)


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


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_written_in_place_make_the_hf_tensors(tiny_qwen3, tmp_path, tp):
    """The weight sync's assembly (`ModelMapping.write_shard` of every TP rank's shard into
    `hf_shapes` buffers, or straight into `shard_place` when it is one region) gives exactly the
    checkpoint's HF tensors, for every tensor of a tiny Qwen3 and Qwen3-VL: QKV groups, packed ViT
    QKV and its bias, [gate; up], row- and column-parallel linears, replicated norms."""

    from megatron_rlsd.models.registry import hf_mapping, model_module
    from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

    vl = build_tiny_qwen3_vl(tmp_path / "vl", num_layers=2, vision_depth=2, vision_num_heads=4, num_heads=8,
                             num_kv_heads=4, seed=5)
    for folder in (tiny_qwen3["untied"], vl):
        cfg = json.loads((folder / "config.json").read_text())
        shape = model_module(cfg).Shape.from_hf_config(cfg)
        shape.check_parallel(tp, 1)  # the models split at TP 1, 2 and 4
        mapping = hf_mapping(shape)
        hf = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        kinds = set()
        for canonical in mapping.canonical_names():
            full = mapping.to_megatron(canonical, hf.__getitem__)
            shapes = mapping.hf_shapes(canonical, tuple(full.shape))
            assert [n for n, _ in shapes] == list(mapping.hf_sources(canonical))
            out = [torch.full(shape, float("nan"), dtype=full.dtype) for _, shape in shapes]
            split = tp if mapping.tp_dim(canonical) is not None else 1
            for r in range(split):
                shard = mapping.tp_shard(full, canonical, r, split).contiguous()
                place = mapping.shard_place(canonical, r, split, out)
                if place is not None:
                    assert place.is_contiguous() and place.shape == shard.shape
                    place.copy_(shard)
                else:
                    mapping.write_shard(canonical, shard, r, split, out)
            for (name, _), got in zip(shapes, out):
                assert torch.equal(got, hf[name]), (canonical, name, tp)
            kinds.add(mapping.rule(canonical).kind)
        assert kinds >= ({"direct", "qkv", "gate_up", "packed_qkv"} if folder == vl else {"direct", "qkv", "gate_up"})
