"""Qwen3 dense decoder on Megatron-Core, built from a Hugging Face `config.json`.

Qwen3 = GQA attention with per-head RMSNorm on q and k, SwiGLU MLP, RoPE, RMSNorm, no biases,
optionally tied input/output embeddings. Everything maps onto Megatron-Core's GPTModel; the only
choice made here is the layer spec: Transformer Engine when it imports (GPU clusters), the local
Megatron-Core spec otherwise (CPU, or GPU without TE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_rlsd.platform import Platform

ARCHITECTURE = "Qwen3ForCausalLM"


@dataclass(frozen=True)
class Qwen3Shape:
    """The architecture hyperparameters read from an HF Qwen3 config."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float = 0.02

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Qwen3Shape:
        # transformers 5 nests rope settings under `rope_parameters`; older configs have rope_theta.
        rope = cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope_type {rope_type!r} is not supported for Qwen3 (only default RoPE)")
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if cfg.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported: Qwen3 dense checkpoints use full attention")
        heads = cfg["num_attention_heads"]
        return cls(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            initializer_range=cfg.get("initializer_range", 0.02),
        )

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise ValueError naming the fix when TP/PP cannot split this model."""
        if self.num_key_value_heads % tp:
            raise ValueError(
                f"tensor parallel size {tp} does not divide num_key_value_heads="
                f"{self.num_key_value_heads}; pick TP from the divisors of {self.num_key_value_heads}"
            )
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide num_attention_heads={self.num_attention_heads}")
        if self.vocab_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide vocab_size={self.vocab_size}")
        if self.intermediate_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide intermediate_size={self.intermediate_size}")
        if self.num_layers % pp:
            raise ValueError(
                f"pipeline parallel size {pp} does not divide num_hidden_layers={self.num_layers}; "
                f"pick PP from the divisors of {self.num_layers}"
            )


Shape = Qwen3Shape


def hf_mapping(shape: Qwen3Shape):
    from megatron_rlsd.checkpoint.hf_mapping import qwen3_mapping

    return qwen3_mapping(shape)


def load_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --hf-dir must be a Hugging Face model folder with config.json")
    with open(path) as f:
        return json.load(f)


def transformer_engine_import_error() -> str | None:
    """Why Transformer Engine's PyTorch binding does not import here (None: it does)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a binding built against another torch (OSError, ...)
        return f"{type(e).__name__}: {e}"
    return None


def layer_spec(use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


def stack_fields(num_layers: int, hidden_size: int, heads: int, groups: int, head_dim: int, ffn_size: int, *,
                 norm: str, eps: float, qk_norm: bool, gated: bool, activation, bias: bool) -> dict:  # fmt: skip
    """TransformerConfig's architecture fields for one transformer stack: sizes (`groups`: key/value
    heads), norm type and epsilon, q/k norms, gated MLP and its activation, biases on all linears."""
    return dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        ffn_hidden_size=ffn_size,
        normalization=norm,
        layernorm_epsilon=eps,
        qk_layernorm=qk_norm,
        gated_linear_unit=gated,
        activation_func=activation,
        add_bias_linear=bias,
        add_qkv_bias=bias,
    )


def transformer_config(
    shape: Qwen3Shape,
    platform: Platform,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    use_te: bool = False,
):
    """Megatron TransformerConfig for Qwen3. Fusions: the bias/activation/dropout ones are
    torch-fused (any GPU); the masked-softmax kernel only comes with Transformer Engine."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = not platform.is_cpu
    return TransformerConfig(
        **stack_fields(shape.num_layers, shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads,
                       shape.head_dim, shape.intermediate_size, norm="RMSNorm", eps=shape.rms_norm_eps, qk_norm=True,
                       gated=True, activation=F.silu, bias=False),  # fmt: skip
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.initializer_range,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=platform.is_cpu,
        perform_initialization=init_weights,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def language_model(shape: Qwen3Shape, config, spec, *, pre_process: bool, post_process: bool,
                   vp_stage: int | None = None, position_embedding_type: str = "rope"):  # fmt: skip
    """One pipeline stage of a Qwen3 decoder with layers built from `spec`, as a Megatron GPTModel
    (logits stay vocab-parallel)."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type=position_embedding_type,
        rotary_percent=1.0,
        rotary_base=int(shape.rope_theta),
        vp_stage=vp_stage,
    )


def build_model(shape: Qwen3Shape, config, *, pre_process: bool, post_process: bool, use_te: bool,
                vp_stage: int | None = None):  # fmt: skip
    """One pipeline stage of Qwen3 (see `language_model`)."""
    return language_model(shape, config, layer_spec(use_te), pre_process=pre_process, post_process=post_process,
                          vp_stage=vp_stage)  # fmt: skip
