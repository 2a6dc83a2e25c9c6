"""Build a tiny, fully local Qwen3 checkpoint for tests and smoke runs.

The checkpoint written by :func:`build_tiny_qwen3` is a regular Hugging Face
folder (``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``, chat template) that
``transformers`` loads with ``from_pretrained`` and vLLM can serve, without any
network access.

* Tokenizer: byte-level BPE trained on the fly with the ``tokenizers`` library
  (Qwen2/3 style pre-tokenization: digits are split one per token), with the
  Qwen special tokens ``<|endoftext|>`` (pad/bos), ``<|im_start|>`` and
  ``<|im_end|>`` (eos) at ids 0, 1, 2 and a Qwen-like ChatML chat template.
* Model: ``Qwen3ForCausalLM`` with random weights drawn from a private
  ``torch.Generator`` seeded with ``seed`` (global RNG state is untouched), so
  the same arguments give bit-identical safetensors.
* ``config.vocab_size`` is the tokenizer length padded up to a multiple of 128
  (Megatron needs the vocabulary to divide by the tensor-parallel size).  The
  padding rows of the LM head are zero, so a random model rarely samples an id the
  tokenizer cannot decode (see :func:`random_model` for the input embedding).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# The builder, tokenizer and summary, plus the building blocks megatron_rlsd.models.tiny_vl
# shares (text arguments and config fields, vocabulary, random init, saving, chat template).
__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "SUPPORTED_HEAD_DIMS",
    "VOCAB_MULTIPLE",
    "TinyText",
    "TinyVocab",
    "build_tiny_qwen3",
    "build_tiny_tokenizer",
    "chatml_template",
    "default_corpus",
    "random_model",
    "save_checkpoint",
    "summarize_checkpoint",
]

# Special tokens, in id order (0, 1, 2).
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# The Megatron side requires vocab_size % (tensor-parallel size) == 0; 128
# covers every TP size we use.
VOCAB_MULTIPLE = 128

# Head sizes supported by vLLM's CPU attention backend (and fine on GPU).
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)

# Target size of the trained BPE vocabulary (bytes + merges + specials); a
# small corpus may stop earlier.  Kept below 1024 so the default build has
# some padding rows.
_BPE_VOCAB_TARGET = 1000

# Qwen2 / Qwen3 pre-tokenizer split pattern (single digits, words with an
# optional leading non-letter, punctuation runs, newlines, spaces).
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def chatml_template(render_part: str) -> str:
    """A Qwen-like ChatML chat template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per
    message, then ``<|im_start|>assistant\\n`` if ``add_generation_prompt``. Content is a string
    or a list of parts, each rendered by the Jinja snippet ``render_part`` (loop variable ``part``)."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        + render_part
        + "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


# Text parts only ({"type": "text", "text": ...}).
CHAT_TEMPLATE = chatml_template("{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}")


def default_corpus() -> list[str]:
    """Deterministic built-in training text for the tiny tokenizer.

    Covers what the synthetic RL tasks print: digits and arithmetic, task
    instructions, answer/thought tags, ``\\boxed{}``, reference solutions and
    ChatML role names.
    """
    phrases = [
        "You are a helpful assistant.",
        "Solve the following problem. Put your final answer inside <answer> and </answer> tags.",
        "Solve the following arithmetic problem step by step.",
        "Think step by step inside <thought> and </thought>, then give the answer in <answer></answer>.",
        "Put the final answer in \\boxed{}.",
        "Here is a reference solution to the problem.",
        "Use the reference solution to check your answer.",
        "The reference solution is correct.",
        "The answer is correct. The answer is incorrect.",
        "Question: What is the value of the expression?",
        "Answer: the final answer is shown below.",
        "Let's think step by step.",
        "First, compute the product. Then add the remaining numbers.",
        "Compute the sum, the difference, the product and the quotient.",
        "Evaluate the expression and simplify the result.",
        "Count the number of items in the list.",
        "Sort the numbers in increasing order.",
        "Reverse the sequence of digits.",
        "Find the maximum and the minimum of the numbers.",
        "Is the number even or odd? Is it prime?",
        "Reward: 1.0 Reward: 0.0 score format accuracy",
        "user assistant system tool",
        "The quick brown fox jumps over the lazy dog.",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z",
        "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 -1 -5 3.5 0.25 1/2",
        "+ - * / = ( ) [ ] { } < > , . : ; ! ? ' \" # % & ^ _ | ~ ` @ $ \\",
        "\\boxed{0} \\boxed{1} \\boxed{42} \\frac{1}{2} \\times \\div",
        "<answer>0</answer> <answer>1</answer> <thought></thought>",
        "Therefore, the answer is <answer>7</answer>.",
        "So the final answer is \\boxed{12}.",
    ]
    texts: list[str] = []
    for _ in range(3):
        texts.extend(phrases)
    ops = ["+", "-", "*", "/"]
    for i in range(240):
        a = (i * 37 + 5) % 100
        b = (i * 53 + 11) % 50 + 1
        c = (i * 29 + 3) % 20 + 1
        op = ops[i % 4]
        if op == "+":
            res = a + b
        elif op == "-":
            res = a - b
        elif op == "*":
            res = a * b
        else:
            a = a * b  # exact division
            res = a // b
        kind = i % 6
        if kind == 0:
            texts.append(f"Solve {a}{op}{b}. <answer>{res}</answer>")
        elif kind == 1:
            texts.append(
                f"Solve the problem: {a} {op} {b} = ?\n"
                f"<thought>We compute {a} {op} {b} = {res}.</thought>\n<answer>{res}</answer>"
            )
        elif kind == 2:
            val = (a + b) * c
            texts.append(
                f"Compute ({a} + {b}) * {c}.\nReference solution: ({a} + {b}) * {c} = "
                f"{a + b} * {c} = {val}. The answer is \\boxed{{{val}}}."
            )
        elif kind == 3:
            texts.append(
                f"What is {a} {op} {b}? Give the answer in <answer></answer> tags.\n"
                f"The answer is <answer>{res}</answer>."
            )
        elif kind == 4:
            texts.append(
                f"user\nSolve {a}{op}{b}-{c}. Put your final answer in \\boxed{{}}.\n"
                f"assistant\n<thought>{a}{op}{b}={res}, {res}-{c}={res - c}</thought>\n"
                f"\\boxed{{{res - c}}}"
            )
        else:
            texts.append(
                f"Here is a reference solution: {a} {op} {b} = {res}. "
                f"Check the answer {res} against the reference solution."
            )
    return texts


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, *, extra_special_tokens: Sequence[str] = ()):
    """Train a deterministic byte-level BPE tokenizer and wrap it for HF.

    Returns a ``transformers.PreTrainedTokenizerFast`` with the Qwen special
    tokens at ids 0 (``<|endoftext|>``), 1 (``<|im_start|>``) and 2
    (``<|im_end|>``) and the ChatML chat template.  ``extra_special_tokens``
    (e.g. Qwen3-VL's ``<|vision_start|>``) are appended after the trained
    vocabulary, in order, as special tokens that never split.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        texts = default_corpus()
    else:
        if isinstance(corpus, (str, bytes)):
            raise ValueError("corpus must be a list of strings, not a single string")
        texts = list(corpus)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("corpus must be a non-empty list of strings")

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_TARGET,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    if extra_special_tokens:
        extra = list(extra_special_tokens)
        if len(set(extra)) != len(extra) or set(extra) & set(SPECIAL_TOKENS):
            raise ValueError(f"extra_special_tokens must be new and distinct, got {extra}")
        tok.add_special_tokens(extra)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


@dataclass(frozen=True)
class TinyVocab:
    """The trained tokenizer and the vocabulary facts a tiny config needs."""

    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    size: int  # config vocab_size: the tokenizer length, padded
    pad_id: int
    eos_id: int

    @property
    def real_size(self) -> int:
        return len(self.tokenizer)


@dataclass(frozen=True)
class TinyText:
    """The text decoder and tokenizer arguments both tiny builders take (with these defaults).

    Raises ``ValueError`` on a bad shape, an unsupported ``head_dim`` or a negative ``seed``;
    a bad ``vocab_size`` or ``corpus`` is refused when the vocabulary is built (:meth:`vocab`).
    """

    tie_word_embeddings: bool = False
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    vocab_size: int | None = None  # default: the tokenizer length rounded up to VOCAB_MULTIPLE
    seed: int = 0
    corpus: Sequence[str] | None = None  # trains the tokenizer; default: default_corpus()

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head_dim={self.head_dim} is not supported (vLLM CPU attention supports "
                f"head_dim in {list(SUPPORTED_HEAD_DIMS)})"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    def vocab(self, extra_special_tokens: Sequence[str] = ()) -> TinyVocab:
        """Train the tiny tokenizer (see :func:`build_tiny_tokenizer`) and size the vocabulary."""
        tokenizer = build_tiny_tokenizer(self.corpus, extra_special_tokens=extra_special_tokens)
        return TinyVocab(
            tokenizer=tokenizer,
            size=_padded_vocab(len(tokenizer), self.vocab_size),
            pad_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
            eos_id=tokenizer.convert_tokens_to_ids(IM_END),
        )

    def config_fields(self, vocab: TinyVocab) -> dict:
        """The Qwen3 text-decoder config fields both builders share (sizes, SiLU, RMSNorm eps, no
        attention bias, fp32, special token ids); rope and context length are each builder's."""
        return dict(
            vocab_size=vocab.size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            initializer_range=0.02,
            rms_norm_eps=1e-6,
            attention_bias=False,
            bos_token_id=vocab.pad_id,
            eos_token_id=vocab.eos_id,
            pad_token_id=vocab.pad_id,
            dtype="float32",
        )


def _padded_vocab(tokenizer_len: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        return -(-tokenizer_len // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < tokenizer_len:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tokenizer length ({tokenizer_len})"
        )
    if vocab_size % VOCAB_MULTIPLE != 0:
        raise ValueError(f"vocab_size={vocab_size} must be a multiple of {VOCAB_MULTIPLE}")
    return vocab_size


def build_tiny_qwen3(out_dir: str | os.PathLike, **text) -> pathlib.Path:
    """Write a tiny random Qwen3 HF checkpoint (model + tokenizer) to ``out_dir``.

    ``text``: the fields of :class:`TinyText` (``tie_word_embeddings``, ``num_layers``,
    ``hidden_size``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``intermediate_size``,
    ``vocab_size``, ``seed``, ``corpus``). Same arguments -> bit-identical files. Raises
    ``ValueError`` on bad shapes, an unsupported ``head_dim`` or a bad explicit ``vocab_size``.
    Returns ``out_dir`` as a :class:`pathlib.Path`.
    """
    t = TinyText(**text)

    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = t.vocab()
    config = Qwen3Config(
        architectures=["Qwen3ForCausalLM"],
        **t.config_fields(vocab),
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_dropout=0.0,
        use_sliding_window=False,
        tie_word_embeddings=bool(t.tie_word_embeddings),
        use_cache=True,
    )

    model = random_model(Qwen3ForCausalLM, config, t.seed, lambda name: config.initializer_range, vocab.real_size)
    if t.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return save_checkpoint(out_dir, model, vocab, vocab.tokenizer)


def random_model(model_class, config, seed: int, std_of, real_vocab: int):
    """`model_class(config)` in fp32 with weights drawn from a private generator seeded with `seed`
    (the caller's global RNG is untouched; the result does not depend on transformers' init):
    matrices and biases ~ N(0, std_of(name)), norm weights 1, norm biases 0. LM-head rows past
    `real_vocab` (padding) are zero, so the random model rarely emits those ids.

    Their input-embedding rows stay random like every other row (when the embeddings are untied):
    a policy does sample padding ids now and then, and a zero input row makes the first RMSNorm
    normalise a zero vector, whose gradient is scaled by 1/sqrt(eps) = 1000: single sampled
    tokens then dominated RL gradient norms (100-1000x a normal step) and, clipped, stalled
    learning. Tied embeddings share one matrix, so there the padding rows are zero on both sides."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(torch.float32).eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        params = dict(model.named_parameters())  # tied weights appear once
        for name in sorted(params):
            p = params[name]
            is_norm = p.dim() == 1 and "norm" in name.rsplit(".", 2)[-2]
            if is_norm:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std_of(name))
        if model.get_output_embeddings().weight.shape[0] > real_vocab:
            model.get_output_embeddings().weight[real_vocab:].zero_()
    return model


def save_checkpoint(out_dir: str | os.PathLike, model, vocab: TinyVocab, files,
                    extra_special_tokens: Sequence[str] = ()) -> pathlib.Path:  # fmt: skip
    """Write `model` (with a greedy generation config) and `files` (the tokenizer, or a processor
    holding it) to `out_dir`, with a tokenizer_config.json that transformers 4 and 5 both load."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=vocab.pad_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id, do_sample=False
    )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    files.save_pretrained(out)
    _make_tokenizer_config_portable(out / "tokenizer_config.json", extra_special_tokens)
    return out


def _make_tokenizer_config_portable(path: pathlib.Path, extra_special_tokens: Sequence[str]) -> None:
    # transformers 5 records its internal class name ("TokenizersBackend"),
    # which transformers 4.x cannot resolve; "PreTrainedTokenizerFast" loads
    # tokenizer.json in both major versions (v5 aliases it).  <|im_start|> is
    # listed as an additional special token like Qwen does (v5 maps the key
    # to extra_special_tokens, v4 reads it as is).
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("extra_special_tokens", None)
    cfg["additional_special_tokens"] = [IM_START, *extra_special_tokens]
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def summarize_checkpoint(path: str | os.PathLike) -> dict:
    """Cheap summary of a checkpoint folder (no model instantiation).

    Returns ``{"path", "params", "vocab_size", "tokenizer_len", "tied"}``;
    ``params`` counts unique stored tensors' elements (a tied LM head is
    counted once).
    """
    from safetensors import safe_open

    path = pathlib.Path(path)
    cfg = json.loads((path / "config.json").read_text())
    n_params = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                n = 1
                for d in sf.get_slice(k).get_shape():
                    n *= d
                n_params += n
    tok_len = None
    tok_file = path / "tokenizer.json"
    if tok_file.exists():
        from tokenizers import Tokenizer

        tok_len = Tokenizer.from_file(str(tok_file)).get_vocab_size(with_added_tokens=True)
    return {
        "path": str(path),
        "params": n_params,
        "vocab_size": cfg["vocab_size"] if "vocab_size" in cfg else cfg["text_config"]["vocab_size"],  # VL: nested
        "tokenizer_len": tok_len,
        "tied": bool(cfg.get("tie_word_embeddings", False)),
    }
