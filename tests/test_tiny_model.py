"""Tests for megatron_rlsd.models.tiny (tiny local Qwen3 checkpoints)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from megatron_rlsd.models.tiny import (
    CHAT_TEMPLATE,
    VOCAB_MULTIPLE,
    build_tiny_qwen3,
    summarize_checkpoint,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC_TEXTS = [
    "Solve 12+7. <answer>19</answer>",
    "Solve the following problem: (3 + 4) * 5 - 6 / 2 = ?",
    "<thought>First 3*4=12, then 12+7=19.</thought>\n<answer>19</answer>",
    "Here is a reference solution: \\boxed{42}",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "unicode: café, 数学, emoji 🙂",  # byte-level BPE covers any text
]


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def _chat_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "untied": build_tiny_qwen3(root / "untied", tie_word_embeddings=False),
        "tied": build_tiny_qwen3(root / "tied", tie_word_embeddings=True),
    }


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_loads_and_ties(ckpts, kind):
    path = ckpts[kind]
    assert (path / "model.safetensors").is_file()
    model, tok = _load(path)
    cfg = model.config
    assert cfg.model_type == "qwen3" and cfg.architectures == ["Qwen3ForCausalLM"]
    assert model.dtype == torch.float32
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (kind == "tied") == cfg.tie_word_embeddings
    if kind == "untied":
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert cfg.rope_parameters["rope_theta"] == 1e6
    assert cfg.rms_norm_eps == 1e-6
    # vocabulary: padded to a multiple of 128; padding rows are zero in the LM head (rarely
    # sampled), and untied, random in the input embedding (a zero input row's RMSNorm gradient
    # is 1000x: one sampled padding id would dominate an RL step's gradient norm)
    assert cfg.vocab_size % VOCAB_MULTIPLE == 0
    assert len(tok) <= cfg.vocab_size < len(tok) + VOCAB_MULTIPLE
    assert model.model.embed_tokens.weight.shape[0] == cfg.vocab_size
    assert torch.count_nonzero(model.lm_head.weight[len(tok):]) == 0
    padding_rows = model.model.embed_tokens.weight[len(tok):]
    if kind == "untied":
        assert padding_rows.abs().amin(dim=1).gt(0).all() and 0.01 < padding_rows.std() < 0.03
    # special tokens (Qwen style) agree between tokenizer, config and generation config
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id
    assert set(tok.all_special_ids) == {0, 1, 2}
    summary = summarize_checkpoint(path)
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert summary["vocab_size"] == cfg.vocab_size and summary["tokenizer_len"] == len(tok)


def test_chat_template_and_roundtrip(ckpts):
    _, tok = _load(ckpts["untied"])
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Solve 12+7."},
    ]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nSolve 12+7.<|im_end|>\n<|im_start|>assistant\n"
    )
    no_gen = tok.apply_chat_template(msgs[1:], add_generation_prompt=False, tokenize=False)
    assert no_gen == "<|im_start|>user\nSolve 12+7.<|im_end|>\n"
    assert tok.chat_template == CHAT_TEMPLATE
    ids = _chat_ids(tok, msgs)
    assert ids[0] == 1 and ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    assert tok.decode(ids) == text
    for s in SYNTHETIC_TEXTS:
        enc = tok.encode(s, add_special_tokens=True)
        assert tok.decode(enc) == s, s
        assert max(enc) < len(tok)
    # special tokens are atomic; digits are split one per token (Qwen style)
    assert tok.encode("<|im_end|>") == [2]
    assert len(tok.encode("12345")) == 5
    # the default corpus taught merges for the task vocabulary
    assert len(tok.encode("answer")) == 1 and len(tok.encode("Solve")) == 1


def test_generate(ckpts):
    model, tok = _load(ckpts["tied"])
    ids = torch.tensor([_chat_ids(tok, [{"role": "user", "content": "Solve 3+4."}])])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_deterministic(ckpts, tmp_path):
    again = build_tiny_qwen3(tmp_path / "again", tie_word_embeddings=False, seed=0)
    ref = ckpts["untied"]
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (ref / name).read_bytes() == (again / name).read_bytes(), name
    other = build_tiny_qwen3(tmp_path / "other", tie_word_embeddings=False, seed=1)
    assert (other / "model.safetensors").read_bytes() != (ref / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()


def test_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_qwen3(tmp_path / "m", num_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_custom_shapes_vocab_and_corpus(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_qwen3(
        tmp_path / "custom", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1,
        head_dim=64, intermediate_size=96, vocab_size=1024,
        corpus=["Solve 1+1. <answer>2</answer>", "hello world"] * 4,
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == 1024 and model.config.head_dim == 64
    assert model.config.num_key_value_heads == 1 and model.config.num_hidden_layers == 2
    assert tok.decode(tok.encode("Solve 1+1. <answer>2</answer>")) == "Solve 1+1. <answer>2</answer>"
    assert len(tok) < 300  # tiny corpus -> mostly the 256 byte tokens


@pytest.mark.parametrize(
    "kwargs",
    [
        {"head_dim": 16},
        {"head_dim": 48},
        {"num_heads": 4, "num_kv_heads": 3},
        {"num_layers": 0},
        {"hidden_size": -8},
        {"vocab_size": 700},  # not a multiple of 128
        {"vocab_size": 128},  # smaller than the tokenizer
        {"corpus": []},
        {"corpus": "not a list"},
    ],
)
def test_bad_args(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_tiny_qwen3(tmp_path / "bad", **kwargs)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "tools/make_tiny_model.py", "--out", str(out), "--tied", "--layers", "1",
         "--seed", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert "params=" in line and "vocab=768" in line and str(out) in line
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 1
    bad = subprocess.run(
        [sys.executable, "tools/make_tiny_model.py", "--out", str(tmp_path / "bad"), "--head-dim", "48"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "head_dim" in bad.stderr


def _hf_sampled_logprobs(model, prompt, response, temperature, top_p):
    """HF's log-probs of `response` after `prompt` under softmax(logits / temperature), restricted
    to the top-p nucleus and renormalized (vLLM's rule: drop the tokens whose ascending cumulative
    probability is <= 1 - top_p, keep at least one). Also each step's nucleus mass and whether
    the token was inside it."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1)
    dropped_sorted = sorted_probs.cumsum(-1) <= 1 - top_p
    dropped_sorted[:, -1] = False
    dropped = torch.zeros_like(dropped_sorted).scatter_(-1, order, dropped_sorted)
    mass = (probs * ~dropped).sum(-1)
    target = torch.tensor(response)[:, None]
    full = torch.log_softmax(logits, -1).gather(-1, target)[:, 0]
    return full - mass.log(), mass, ~dropped.gather(-1, target)[:, 0]


def test_vllm_engine_samples_at_temperature_like_hf(ckpts, tmp_path):
    """The repo's VLLMEngine on both checkpoints (weights pushed from model.safetensors): its
    log-probs are those of the distribution it sampled from, at T = 0.7, whole vocabulary or
    top-p nucleus; the HF forward of the same tokens agrees."""
    from conftest import torchrun
    from workers.vllm_text import LEFT_OUT, TEMPERATURE, TOP_P

    spec, models = {}, {}
    for name, path in ckpts.items():
        models[name], tok = _load(path)
        prompt = _chat_ids(tok, [{"role": "user", "content": "Solve 12+7. Put the answer in <answer></answer>."}])
        spec[name] = {"path": str(path), "prompt": prompt}
    log = tmp_path / "vllm.log"
    spec_path, report_path = tmp_path / "spec.json", tmp_path / "report.json"
    spec_path.write_text(json.dumps(spec))
    proc = torchrun("tests/workers/vllm_text.py", str(spec_path), str(report_path), str(log), nproc=1)
    report = json.loads(report_path.read_text())

    diffs, truncation = {}, []
    for name, by_top_p in report.items():
        for top_p, gens in by_top_p.items():
            for g in gens:
                assert g["prompt_ids"] == spec[name]["prompt"] and g["response_ids"]
                ref, mass, inside = _hf_sampled_logprobs(
                    models[name], g["prompt_ids"], g["response_ids"], TEMPERATURE, float(top_p)
                )
                assert inside.all()  # every sampled token was in its step's nucleus (top-p applied)
                d = (torch.tensor(g["logprobs"]) - ref).abs().max().item()
                diffs[name, top_p] = max(diffs.get((name, top_p), 0.0), d)
                truncation.append(-mass.log().max().item())
    print(f"vLLM engine vs HF fp32, sampled log-probs at T={TEMPERATURE}: max abs diff {diffs}")
    assert max(diffs.values()) <= 1e-5  # measured <= 9.6e-7 (fp32 on both sides)
    # at top_p < 1 they exceed the whole-vocabulary ones by -log(nucleus mass), here about log 2
    assert max(truncation) > 0.5  # measured 0.693

    # vLLM's log: complete updates report nothing; the update without LEFT_OUT's tensors is
    # reported (by name and by layer), and no false alarm for the rotary cache in either case
    text = log.read_text()
    assert text.count("were not loaded") == 1 and f"{LEFT_OUT}qkv_proj.weight" in text
    assert "QKVParallelLinear: Failed to load weights" in text
    assert "RotaryEmbedding: Failed" not in text
    assert "were not loaded" not in proc.stdout + proc.stderr  # the console stays quiet
