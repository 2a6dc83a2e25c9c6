"""Qwen3 dense decoder on Megatron-Core, built from a Hugging Face `config.json`.

Qwen3 = GQA attention with per-head RMSNorm on q and k, SwiGLU MLP, RoPE, RMSNorm, no biases,
optionally tied input/output embeddings. Everything maps onto Megatron-Core's GPTModel; the choices
made here are the layer spec (Transformer Engine when it imports, on GPU clusters; the local
Megatron-Core spec otherwise: CPU, or GPU without TE), the memory options (activation
recomputation, sequence parallelism) and `Qwen3GPTModel`'s logits at chosen positions only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel

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


class TorchNorm:
    """The local spec's norms: torch's RMSNorm / LayerNorm, as Megatron-Core's WrappedTorchNorm, but
    also under sequence parallelism. There each TP rank normalises its own part of the sequence, so
    a norm's weight gradient is a partial sum: flagged `sequence_parallel`, finalize_model_grads
    sums it over the TP ranks (as for Megatron's fused and Transformer Engine norms).
    WrappedTorchNorm refuses sequence parallelism instead."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        kinds = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        norm = kinds[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)  # bf16 like the rest
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def layer_spec(use_te: bool):
    """A Qwen3 decoder layer: Megatron-Core's Transformer Engine spec, or its local spec with
    `TorchNorm` norms (input, pre-MLP, q and k)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    layer, attention = spec.submodules, spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, q_layernorm=TorchNorm, k_layernorm=TorchNorm)
    )
    layer = dataclasses.replace(layer, input_layernorm=TorchNorm, self_attention=attention, pre_mlp_layernorm=TorchNorm)
    return dataclasses.replace(spec, submodules=layer)


def decoder_spec(layer, config, use_te: bool, vp_stage: int | None = None):
    """This pipeline stage's decoder block of `layer`s. Transformer Engine: Megatron's default block
    (final norm TENorm); local: the final norm is a `TorchNorm` too."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if use_te:
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage), layer_norm=TorchNorm)


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


RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def recompute_fields(recompute: str, method: str, num_layers: int, layers_per_stage: int) -> dict:
    """TransformerConfig's activation-recompute fields for `model.recompute` (none | selective:
    attention's core, Megatron's default `recompute_modules` | full: whole layers), and for full,
    `model.recompute_method` (uniform: groups of `num_layers` layers | block: the first
    `num_layers` layers of each pipeline stage). Raises ValueError naming the fix."""
    if recompute not in RECOMPUTE or method not in RECOMPUTE_METHODS or num_layers < 1:
        raise ValueError(f"model.recompute must be one of {', '.join(RECOMPUTE)} (got {recompute!r}), "
                         f"model.recompute_method one of {', '.join(RECOMPUTE_METHODS)} (got {method!r}) and "
                         f"model.recompute_num_layers >= 1 (got {num_layers})")  # fmt: skip
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if method == "uniform" and layers_per_stage % num_layers:
        raise ValueError(
            f"model.recompute_num_layers={num_layers} does not divide the {layers_per_stage} decoder layers of a "
            f"pipeline stage (recompute_method=uniform checkpoints groups of that many layers); pick a divisor of "
            f"{layers_per_stage} or set model.recompute_method=block"
        )
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


def transformer_config(
    shape: Qwen3Shape,
    platform: Platform,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    use_te: bool = False,
    sequence_parallel: bool = False,
    recompute: str = "none",
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
):
    """Megatron TransformerConfig for Qwen3. Fusions: the bias/activation/dropout ones are
    torch-fused (any GPU); the masked-softmax kernel only comes with Transformer Engine.
    `sequence_parallel` takes effect at TP > 1 (parallel.sequence_parallel); the recompute
    arguments are model.recompute* (`recompute_fields`). Raises ValueError naming the fix."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = not platform.is_cpu
    return TransformerConfig(
        **stack_fields(shape.num_layers, shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads,
                       shape.head_dim, shape.intermediate_size, norm="RMSNorm", eps=shape.rms_norm_eps, qk_norm=True,
                       gated=True, activation=F.silu, bias=False),  # fmt: skip
        **recompute_fields(recompute, recompute_method, recompute_num_layers, shape.num_layers // pp),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.initializer_range,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
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


class Qwen3GPTModel(GPTModel):
    """Megatron-Core's GPTModel whose last stage can compute the logits of chosen positions only.

    forward(..., logit_positions=None): with `logit_positions` [b, R] int64 (e.g. the positions
    that predict a response's tokens) the last stage applies the output layer to those rows of the
    final hidden states only and returns vocab-parallel logits [b, R, V/tp] instead of
    [b, s, V/tp]; the other stages ignore it. A long prompt's logits, the largest activation of the
    last stage, are never made.
    """

    _logit_positions: torch.Tensor | None = None

    def forward(self, *args, logit_positions: torch.Tensor | None = None, **kwargs):
        self._logit_positions = logit_positions  # for _postprocess, which makes the logits
        try:
            output = super().forward(*args, **kwargs)
        finally:
            self._logit_positions = None
        if logit_positions is not None and self.post_process:
            output = output[:, : logit_positions.shape[1]]  # without rows padded for sequence parallelism
        return output

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self._logit_positions is not None and self.post_process:
            hidden_states = self._rows_at(hidden_states, self._logit_positions)
        return super()._postprocess(hidden_states, *args, **kwargs)

    def _rows_at(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final hidden states [s, b, h] at `positions` [b, R] as the output layer takes them:
        [R, b, h]. Under sequence parallelism `hidden` is this rank's [s/tp, b, h] chunk and the
        output layer takes a chunk too: [R'/tp, b, h], R' = R rounded up to a multiple of TP (the
        extra rows are position 0's, dropped by `forward`). The gathered sequence's gradient comes
        back summed over TP ranks (the output layer reduce-scatters, the scatter all-gathers), so
        the gather's backward only keeps this rank's chunk of it."""
        from megatron.core import tensor_parallel

        sequence_parallel, group = self.config.sequence_parallel, self.pg_collection.tp
        if sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                                          group=group)  # fmt: skip
            positions = F.pad(positions, (0, -positions.shape[1] % group.size()))
        rows = hidden[positions.t(), torch.arange(positions.shape[0], device=positions.device)]
        return tensor_parallel.scatter_to_sequence_parallel_region(rows, group=group) if sequence_parallel else rows


def language_model(shape: Qwen3Shape, config, layer, *, use_te: bool, pre_process: bool, post_process: bool,
                   vp_stage: int | None = None, position_embedding_type: str = "rope",
                   scatter_embedding_sequence_parallel: bool = True):  # fmt: skip
    """One pipeline stage of a Qwen3 decoder of `layer`s (a layer spec), as a `Qwen3GPTModel`
    (logits stay vocab-parallel). Under sequence parallelism the embeddings are split along the
    sequence unless `scatter_embedding_sequence_parallel` is False (the caller splits them)."""
    return Qwen3GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(layer, config, use_te, vp_stage),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type=position_embedding_type,
        rotary_percent=1.0,
        rotary_base=int(shape.rope_theta),
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        vp_stage=vp_stage,
    )


def build_model(shape: Qwen3Shape, config, *, pre_process: bool, post_process: bool, use_te: bool,
                vp_stage: int | None = None):  # fmt: skip
    """One pipeline stage of Qwen3 (see `language_model`)."""
    return language_model(shape, config, layer_spec(use_te), use_te=use_te, pre_process=pre_process,
                          post_process=post_process, vp_stage=vp_stage)  # fmt: skip
