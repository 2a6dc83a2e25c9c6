"""Per-GPU memory of one training step, phase by phase, from the config and the model's config.json.

Pure arithmetic: no weights, no torch at import. `check(cfg, world_size, gpu_memory_bytes)` is the
start-up guard (ValueError naming the phase and the knob when a phase cannot fit); `plan(...)`
returns every term; tools/plan_memory.py prints them. docs/memory.md explains each term.

Notation (per GPU rank): t = TP, p = PP, d = DP; e = bytes of the params dtype (bf16: 2);
h = hidden size, q = heads x head_dim, k = kv_heads x head_dim, f = ffn size, a = heads, L = layers;
V = vocabulary; T = tokens of one micro-batch (padded), s = padded row length, R = logit rows
(response positions) of one micro-batch; hs = h / t with sequence parallelism, h without.
Every bound is a worst case over the data: rows at the prompt and response limits, and with a
token budget, micro-batches full of response (or image) tokens.

Phases (each one adds up what is on the GPU at its peak; PP > 1: the first and the last stage are
planned, the larger is shown):
- rollout: vLLM's share (rollout.gpu_memory_utilization x GPU memory: its bf16 weights, runtime,
  KV cache) + the training side that stays: weights, grads (unless offload.grads), optimizer
  (unless offload.optimizer), teacher (unless offload.teacher), CUDA context. vLLM checks at
  start-up that its share is free, so the sum must fit; its KV cache must hold one sequence
  of max_model_len = data.max_prompt_tokens + rollout.max_new_tokens.
- scoring (student and teacher forward, no grad): resident + what vLLM's sleep keeps + the live
  tensors of the largest layer for one micro-batch + R x V/t logits (params dtype) and the
  log-prob kernel's fp32 chunks + the teacher's distribution of one micro-batch (opsd,
  grpo_opsd, sdpo) + the teacher's weights copied in (offload.teacher).
- update (forward and backward): resident + sleep's leftovers + the stored activations of
  min(p, micro-batches) micro-batches in flight (1F1B's first stage) + the larger of two moments
  of the backward: the loss (logits, their gradient, fp32 chunks) and a layer (the recomputed
  group under full recompute, gradient working set, one weight gradient).
- sync: resident (grads and optimizer still on the GPU) + vLLM's bf16 weights awake (KV cache
  asleep) + one bucket (rollout.weight_bucket_mb, or one larger layer) + one layer for vLLM's
  in-place reload (it re-materialises a module at a time) and the sync's one TP shard of scratch.

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (arXiv 2205.05198): per layer, stored bytes sbh(34 + 5as/h) in 16-bit (eq. 1), the parts
inside attention and MLP divided by t with tensor parallelism (eq. 2), everything divided by t
with sequence parallelism (eq. 3), the first pipeline stage holding p micro-batches of its L/p
layers (eq. 4, 1F1B), selective recomputation dropping the 5as/h attention term and full
recomputation keeping only the layer inputs, 2sbh per layer (Table 2). Adapted here to the code
that runs (Megatron-Core 0.16 Qwen3 layers; elements per token, times e):
  norms:      input of input_layernorm and pre_mlp_layernorm: 2 hs
              (+ 2 hs for torch's composite RMSNorm, the local spec, which keeps x * rstd too)
  linears:    inputs of linear_qkv and linear_fc1: 2 hs (SP: Megatron keeps the sequence shard
              and gathers it again in backward); linear_proj's and linear_fc2's inputs are below
  QKV:        the fused output q + 2k, kept alive by its views (q/k-norm inputs, V)
              + q for the query copy the q-norm keeps (the GQA split is not contiguous)
              + q + k for torch's composite q/k RMSNorms
  rotary:     cos and sin for q and k: 4 x head_dim (exact for M-RoPE; text shares them across
              the rows of a micro-batch, so this bounds it)
  attention:  fused/flash kernel (Transformer Engine): roped Q and K, output O (= linear_proj's
              input): 2q + k, plus a fp32 log-sum-exp; no s^2 term.
              unfused (local spec): Q, K and V repeated to the query heads, context: 4q (3q
              without GQA), plus softmax probabilities a/t x s per token in fp32 (+ a copy in
              the params dtype when that is 16-bit): the paper's 5as/h term without dropout.
              selective (core_attn recomputed): 2q + k, the core's inputs and output only.
  MLP:        SwiGLU fused (GPU): fc1 output 2f (gate and up) + product f (fc2's input) = 3f;
              unfused (CPU): + silu output f + (up + 0) f = 5f; GELU MLP (ViT): 2f.
  fp32:       RMSNorm rstd (2 / (t if SP) + (a + kv heads) / t per token).
  No dropout masks: every dropout probability is 0 (Qwen3), so torch keeps none.
For Qwen3-8B with Transformer Engine: 4h + 4q + 3k + 3f = 16.75 h elements, i.e. 33.5 h bytes
in bf16 per token per layer (the paper's 34 h without the s^2 term).
Full recompute (uniform, N layers a group): ceil(L/N) x hs stored, and one group of N layers
recomputed at the layer moment (block: N layers stored as inputs, the rest stored in full).
Forward only (scoring): the live set of one layer, max(attention, MLP): residual hs + norm output
hs (+ h gathered with SP) + QKV q + 2k + roped Q, K q + k + O q, or + fc1 2f + product f
(+ 2f unfused), plus the unfused scores and probabilities (2 a/t s fp32 per token).
Backward working set of a layer: hs + 2f: the incoming gradient, and the activation's input and
output gradients (3f) less fc2's input (f), freed once fc2's backward is done; for the unfused
attention 3 a/t s fp32 per token (softmax gradients) less the MLP's stored tensors, freed by then.
The ViT (Qwen3-VL, first stage) follows `model.recompute` too (models/qwen3_vl.py): selective
recomputes its attention cores, full checkpoints every block, which then keeps only its input
(h_v per patch) plus, at its backward, one block of one image recomputed. It has no sequence
parallelism. Per patch otherwise: its layers as above (LayerNorm, no q/k norms, MHA, GELU MLP),
the patch embedding's input C x T_p x P^2, the mergers' 2 h_v + 2 h_v/t each, and the
micro-batch's pixels in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20
CUDA_OVERHEAD_BYTES = 2 * GIB
"""Outside PyTorch's tensors on every rank: the CUDA context with its kernel images (~0.6 GiB),
cuBLAS / cuDNN / Transformer Engine workspaces, and the NCCL buffers of Megatron's process groups
(TP, PP, DP, model-parallel, embedding, ...) and of vLLM's (~0.5-1 GiB on an 8-GPU NVLink node)."""
VLLM_RUNTIME_BYTES = 3 * GIB
"""Inside vLLM's share besides weights and KV cache: the activation peak it profiles at start-up
(16k batched tokens), CUDA-graph pools, sampler buffers for max_num_seqs x V fp32 logits."""
VLLM_ASLEEP_BYTES = 1 * GIB
"""What vLLM keeps while asleep (sleep level 2 frees only its pooled weights and KV cache): the
CUDA-graph pool, persistent input and sampler buffers."""
PHASES = ("rollout", "scoring", "update", "sync")
HEADROOM_TARGET = 0.10
"""The plan's own margin: a phase with less free is flagged (the shipped recipes keep more)."""


# ------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Kernels:
    """Which kernels a layer runs (they change what autograd keeps)."""

    flash_attention: bool  # fused attention (no s^2 tensors)
    fused_norm: bool  # norms keep their input only (torch's composite RMSNorm keeps x * rstd too)
    fused_swiglu: bool  # SwiGLU recomputes its intermediates in backward

    @classmethod
    def for_run(cls, transformer_impl: str, on_gpu: bool = True) -> Kernels:
        """Transformer Engine (auto/te on GPU): all fused. The local spec: unfused attention and
        torch norms; SwiGLU is fused on GPU (bias_activation_fusion)."""
        if on_gpu and transformer_impl in ("auto", "te"):
            return cls(True, True, True)
        return cls(False, False, on_gpu)


@dataclass(frozen=True)
class Stack:
    """One transformer stack as the activation formulas see it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool  # SwiGLU (decoder) or GELU (ViT)
    qk_norm: bool
    rms_norm: bool  # RMSNorm (decoder) or LayerNorm (ViT: a fused op even in torch)

    @classmethod
    def decoder(cls, shape) -> Stack:
        return cls(shape.num_layers, shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads,
                   shape.head_dim, shape.intermediate_size, gated=True, qk_norm=True, rms_norm=True)  # fmt: skip

    @classmethod
    def vision(cls, v) -> Stack:
        return cls(v.depth, v.hidden_size, v.num_heads, v.num_heads, v.head_dim, v.intermediate_size,
                   gated=False, qk_norm=False, rms_norm=False)  # fmt: skip


@dataclass(frozen=True)
class Split:
    """How a rank holds a layer's activations: TP shards, and whether sequence parallelism also
    shards what lies outside attention and MLP."""

    tp: int
    sp: bool

    @property
    def seq_div(self) -> int:
        return self.tp if self.sp else 1


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the formulas see it (worst case over the data)."""

    tokens: int  # T: padded tokens, rows x padded length
    seq: int  # s: padded row length (the attention span)
    logit_rows: int  # R: positions whose logits the loss reads (response tokens)
    image_tokens: int = 0  # merged image tokens (Qwen3-VL)
    largest_image_tokens: int = 0  # of one image (the ViT encodes images one at a time)


@dataclass(frozen=True)
class Recompute:
    mode: str = "none"  # none | selective | full
    method: str = "uniform"  # full: uniform | block
    num_layers: int = 1


def _widths(stack: Stack, split: Split) -> tuple[float, float, float, float]:
    """Per-rank widths (hs, q, k, f) of one token's tensors."""
    t = split.tp
    return (stack.hidden / split.seq_div, stack.heads * stack.head_dim / t, stack.kv_heads * stack.head_dim / t,
            stack.ffn / t)  # fmt: skip


def _softmax_bytes(act_bytes: int) -> int:
    """Unfused attention keeps the fp32 softmax output, and its cast to a 16-bit params dtype."""
    return 4 + (act_bytes if act_bytes < 4 else 0)


def _mlp_stored(stack: Stack, split: Split, kernels: Kernels) -> float:
    """Elements per token the MLP's activation keeps (fc1's output onwards)."""
    f = stack.ffn / split.tp
    if not stack.gated:
        return 2 * f  # GELU input (fc1 output + bias) and output
    return 3 * f if kernels.fused_swiglu else 5 * f


def layer_stored(stack: Stack, split: Split, kernels: Kernels, act_bytes: int, seq: int, core: str = "none") -> float:
    """Bytes per token one layer keeps for its backward (see the module doc); `core`: none, or
    selective (the attention core recomputed)."""
    hs, q, k, f = _widths(stack, split)
    gqa = stack.heads != stack.kv_heads
    composite = stack.rms_norm and not kernels.fused_norm
    elems = 2 * hs * (2 if composite else 1) + 2 * hs  # norm inputs (+ normalized), linear inputs
    elems += q + 2 * k  # fused QKV output
    if stack.qk_norm:
        elems += (q if gqa else 0) + ((q + k) if composite else 0)
    elems += 4 * stack.head_dim  # rotary cos / sin
    fp32 = 2 / split.seq_div + ((stack.heads + stack.kv_heads) / split.tp if stack.qk_norm else 0)  # rstd
    heads = stack.heads / split.tp
    if core == "selective":
        elems += 2 * q + k
    elif kernels.flash_attention:
        elems += 2 * q + k
        fp32 += heads  # log-sum-exp
    else:
        elems += 3 * q + (q if gqa else 0)
    elems += _mlp_stored(stack, split, kernels)
    probs = heads * seq * _softmax_bytes(act_bytes) if core != "selective" and not kernels.flash_attention else 0
    return elems * act_bytes + fp32 * 4 + probs


def layer_live(stack: Stack, split: Split, kernels: Kernels, act_bytes: int, seq: int) -> float:
    """Bytes per token alive at once in one layer's forward without autograd (the larger of
    attention and MLP)."""
    hs, q, k, f = _widths(stack, split)
    inputs = 2 * hs + (stack.hidden if split.sp else 0)  # residual, norm output, its gathered copy
    attention = inputs + (q + 2 * k) + (q + k) + q
    if stack.gated:
        mlp = inputs + 3 * f + (0 if kernels.fused_swiglu else 2 * f)
    else:
        mlp = inputs + 2 * f
    scores = 0 if kernels.flash_attention else 2 * stack.heads / split.tp * seq * 4
    return max(attention * act_bytes + scores, mlp * act_bytes)


def layer_backward_working(stack: Stack, split: Split, kernels: Kernels, act_bytes: int, seq: int) -> float:
    """Bytes per token the backward of one layer adds at its peak (see the module doc)."""
    hs, q, k, f = _widths(stack, split)
    mlp = (hs + 2 * f) * act_bytes
    if kernels.flash_attention:
        return mlp
    softmax_grads = 3 * stack.heads / split.tp * seq * 4
    return max(mlp, softmax_grads - _mlp_stored(stack, split, kernels) * act_bytes)


def decoder_update(stack: Stack, split: Split, kernels: Kernels, act_bytes: int, mb: MicroBatch, recompute: Recompute,
                   layers: int) -> tuple[float, float]:  # fmt: skip
    """(stored bytes, bytes of the group recomputed at the layer moment) of `layers` decoder layers
    for one micro-batch."""
    full = layer_stored(stack, split, kernels, act_bytes, mb.seq) * mb.tokens
    layer_input = stack.hidden / split.seq_div * act_bytes * mb.tokens
    if recompute.mode == "none":
        return layers * full, 0.0
    if recompute.mode == "selective":
        return layers * layer_stored(stack, split, kernels, act_bytes, mb.seq, core="selective") * mb.tokens, 0.0
    n = min(recompute.num_layers, layers)
    if recompute.method == "block":
        return n * layer_input + (layers - n) * full, (full if n else 0.0)
    return math.ceil(layers / n) * layer_input, n * full


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Model:
    """What the plan needs from config.json: the stacks, the vocabulary, parameter counts."""

    architecture: str
    shape: object  # models/qwen3.py Qwen3Shape (or the Qwen3-VL subclass)
    decoder: Stack
    vision: Stack | None
    vocab: int
    tied: bool

    @classmethod
    def from_hf_config(cls, hf_config: dict, source: str = "config.json") -> Model:
        from megatron_rlsd.models.registry import architecture_of, model_module

        arch = architecture_of(hf_config, source)
        shape = model_module(hf_config, source).Shape.from_hf_config(hf_config)
        v = getattr(shape, "vision", None)
        return cls(arch, shape, Stack.decoder(shape), Stack.vision(v) if v else None, shape.vocab_size,
                   shape.tie_word_embeddings)  # fmt: skip

    # parameters: (split over TP, replicated) counts
    def _decoder_layer(self) -> tuple[int, int]:
        s = self.decoder
        q, k = s.heads * s.head_dim, s.kv_heads * s.head_dim
        return s.hidden * (q + 2 * k) + q * s.hidden + 3 * s.hidden * s.ffn, 2 * s.hidden + 2 * s.head_dim

    def _vision_block(self) -> tuple[int, int]:
        h, f = self.vision.hidden, self.vision.ffn
        return 3 * h * h + 3 * h + h * h + h * f + f + f * h, 2 * h + 4 * h

    def _mergers(self) -> tuple[int, int]:
        v = self.shape.vision
        m, out = v.merged_size, self.decoder.hidden
        split = m * m + m + m * out
        n_deep = len(v.deepstack_visual_indexes)
        return (1 + n_deep) * split, 2 * v.hidden_size + n_deep * 2 * m + (1 + n_deep) * out

    def _vision_stem(self) -> int:
        v = self.shape.vision
        return v.in_channels * v.temporal_patch_size * v.patch_size**2 * v.hidden_size + v.hidden_size + (
            v.num_position_embeddings * v.hidden_size
        )

    @property
    def patch_inputs(self) -> int:
        """Pixel values per ViT patch (C x T_p x P^2)."""
        v = self.shape.vision
        return v.in_channels * v.temporal_patch_size * v.patch_size**2

    def stage_params(self, tp: int, pp: int, first: bool, last: bool) -> float:
        """Parameters one rank of this stage holds."""
        split, rep = 0, 0
        ls, lr = self._decoder_layer()
        split += ls * self.decoder.layers // pp
        rep += lr * self.decoder.layers // pp
        emb = self.vocab * self.decoder.hidden
        if first:
            split += emb
        if last:
            rep += self.decoder.hidden  # final norm
            if not self.tied or not first:
                split += emb  # output layer (a tied one is a copy on the last stage when PP > 1)
        if first and self.vision:
            vs, vr = self._vision_block()
            ms, mr = self._mergers()
            split += vs * self.vision.layers + ms
            rep += vr * self.vision.layers + mr + self._vision_stem()
        return split / tp + rep

    @property
    def total_params(self) -> int:
        return int(self.stage_params(1, 1, True, True))

    @property
    def largest_group_params(self) -> int:
        """The largest tensor group the weight sync gathers at once (a layer, or one top-level
        tensor such as the embedding)."""
        groups = [sum(self._decoder_layer()), self.vocab * self.decoder.hidden]
        if self.vision:
            v = self.shape.vision
            groups += [sum(self._vision_block()), v.merged_size**2 + v.merged_size * self.decoder.hidden]
        return max(groups)

    @property
    def kv_bytes_per_token(self) -> int:
        """vLLM's bf16 KV cache: K and V of every layer."""
        s = self.decoder
        return 2 * s.layers * s.kv_heads * s.head_dim * 2

    @property
    def largest_layer_linear(self) -> int:
        """Elements of a decoder layer's largest weight matrix (before TP)."""
        s = self.decoder
        return max(2 * s.ffn * s.hidden, s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim)


def vision_update(model: Model, split: Split, kernels: Kernels, act_bytes: int, mb: MicroBatch,
                  recompute: Recompute) -> float:  # fmt: skip
    """Stored bytes of the ViT, its mergers and the pixels for one micro-batch (first stage)."""
    v = model.shape.vision
    patches = mb.image_tokens * v.spatial_merge_size**2
    seq = mb.largest_image_tokens * v.spatial_merge_size**2
    core = "selective" if recompute.mode == "selective" else "none"
    vsplit = Split(split.tp, False)
    one_block = layer_stored(model.vision, vsplit, kernels, act_bytes, seq, core)
    if recompute.mode == "full":  # block inputs kept; one block of one image recomputed at a time
        per_patch, recomputed = model.vision.layers * v.hidden_size * act_bytes, one_block * seq
    else:
        per_patch, recomputed = model.vision.layers * one_block, 0.0
    per_patch += model.patch_inputs * (act_bytes + 4)  # conv input, and the fp32 pixels it came from
    per_patch += (1 + len(v.deepstack_visual_indexes)) * (2 * v.hidden_size + 2 * v.hidden_size / split.tp) * act_bytes
    return per_patch * patches + recomputed


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float


@dataclass
class Phase:
    name: str
    terms: list[Term]
    stage: str = ""  # "first stage" / "last stage" when PP > 1
    notes: list[str] = field(default_factory=list)
    problem: str = ""  # set when the phase cannot work whatever its size (vLLM's KV cache)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class MemoryPlan:
    gpu_bytes: int
    header: list[str]
    phases: list[Phase]
    advice: dict[str, str] = field(default_factory=dict)  # phase -> knob(s) that make it fit

    def fits(self, phase: Phase) -> bool:
        return not phase.problem and phase.total <= self.gpu_bytes

    def headroom(self, phase: Phase) -> float:
        """Share of the GPU left free in `phase`."""
        return 1.0 - phase.total / self.gpu_bytes

    @property
    def failing(self) -> list[Phase]:
        return [p for p in self.phases if not self.fits(p)]

    def problem_line(self, phase: Phase) -> str:
        why = phase.problem or f"{_gib(phase.total)} GiB > {_gib(self.gpu_bytes)} GiB"
        fix = self.advice.get(phase.name)
        return f"{phase.name} does not fit: {why}; {fix}" if fix else f"{phase.name} does not fit: {why}"

    def report(self) -> str:
        width = max(len(t.name) for p in self.phases for t in p.terms) + 2
        lines = list(self.header)
        for p in self.phases:
            lines += ["", f"{p.name}{' (' + p.stage + ')' if p.stage else ''}".ljust(width) + "     GiB"]
            lines += [f"  {t.name}".ljust(width) + f"{_gib(t.bytes):>8}" for t in p.terms]
            verdict = "DOES NOT FIT"
            if self.fits(p):
                verdict = f"fits, {_gib(self.gpu_bytes - p.total)} GiB ({self.headroom(p):.0%}) free"
                if self.headroom(p) < HEADROOM_TARGET:
                    verdict += f", under the plan's {HEADROOM_TARGET:.0%} margin"
            lines.append("  total".ljust(width) + f"{_gib(p.total):>8}   of {_gib(self.gpu_bytes)}: {verdict}")
            lines += [f"  note: {n}" for n in p.notes]
        lines.append("")
        lines += [self.problem_line(p) for p in self.failing] or ["every phase fits"]
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


_DTYPE_NAMES = {2: "bf16", 4: "fp32"}


def micro_batch(cfg, multimodal: bool) -> MicroBatch:
    """The largest micro-batch of the scoring passes and the update (worst case over the data):
    fixed size: micro_batch_size rows of the longest prompt + response; token budget: the budget
    (at least one longest row, which is never split), all of it response (or image) tokens."""
    t, prompt, resp = cfg.trainer, cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
    seq = prompt + resp
    if t.max_tokens_per_microbatch > 0:
        tokens = max(t.max_tokens_per_microbatch, seq)
        logit_rows = images = tokens
    else:
        rows = t.micro_batch_size
        tokens, logit_rows, images = rows * seq, rows * resp, rows * prompt
    if not multimodal:
        return MicroBatch(tokens, seq, logit_rows)
    return MicroBatch(tokens, seq, logit_rows, min(images, tokens), min(prompt, images))


def _chunk_temps(rows: int, vocab: int, tp: int, chunks: int) -> float:
    """`chunks` fp32 temporaries of one chunk of the vocab-parallel kernels on one rank: a chunk
    holds CHUNK_BYTES of full-vocabulary rows (fewer if there are fewer rows), split over the TP
    ranks."""
    from megatron_rlsd.algorithms.vocab_parallel import CHUNK_BYTES

    return chunks * min(CHUNK_BYTES, rows * vocab * 4) / tp


def plan(cfg, world_size: int, gpu_memory_bytes: int, hf_config: dict, *, kernels: Kernels | None = None,
         with_advice: bool = True) -> MemoryPlan:  # fmt: skip
    """The memory plan of `cfg` on `world_size` GPUs of `gpu_memory_bytes` each (Transformer
    Engine's kernels unless `kernels`; `with_advice`: find the knobs that fix a failing phase).
    Raises ValueError (one line) when TP/PP do not split the model or the world size."""
    planner = _Planner(cfg, world_size, gpu_memory_bytes, hf_config, kernels)
    result = MemoryPlan(gpu_memory_bytes, planner.header(), [planner.phase(name) for name in PHASES])
    if with_advice:
        for phase in result.failing:
            result.advice[phase.name] = _advice(phase.name, cfg, world_size, gpu_memory_bytes, hf_config, planner)
    return result


class _Planner:
    """The terms of each phase for one config, layout and model."""

    def __init__(self, cfg, world_size: int, gpu: int, hf_config: dict, kernels: Kernels | None):
        from megatron_rlsd.algorithms.loss_modes import LOSS_MODES

        self.cfg, self.world_size, self.gpu = cfg, world_size, gpu
        self.model = Model.from_hf_config(hf_config)
        par = cfg.parallel
        self.tp, self.pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        self.dp = par.data_parallel_size(world_size)
        self.model.shape.check_parallel(self.tp, self.pp)
        self.kernels = kernels or Kernels.for_run(cfg.model.transformer_impl)
        self.e = 2 if cfg.model.params_dtype == "bfloat16" else 4
        self.split = Split(self.tp, par.sequence_parallel and self.tp > 1)
        self.mode = LOSS_MODES[cfg.algorithm.loss_mode]
        self.mb = micro_batch(cfg, self.model.vision is not None)
        m = cfg.model
        self.recompute = Recompute(m.recompute, m.recompute_method, m.recompute_num_layers)
        t = cfg.trainer
        self.samples = t.prompts_per_step * cfg.rollout.group_size // self.dp // t.mini_batches_per_step
        # 1F1B: the first stage runs PP forwards before its first backward (each micro-batch >= 1 row)
        micro = self.samples if t.max_tokens_per_microbatch > 0 else math.ceil(self.samples / t.micro_batch_size)
        self.in_flight = max(1, min(self.pp, micro))
        a = cfg.algorithm
        self.teacher_kept = not (a.teacher_refresh_interval == 1 and a.teacher_ema_rate == 0)

    def header(self) -> list[str]:
        cfg, model, mb, r = self.cfg, self.model, self.mb, self.recompute
        rows = "token budget" if cfg.trainer.max_tokens_per_microbatch > 0 else f"{cfg.trainer.micro_batch_size} rows"
        images = f", {mb.image_tokens} image tokens" if mb.image_tokens else ""
        recompute = r.mode + (f" ({r.method}, {r.num_layers} layer(s) a group)" if r.mode == "full" else "")
        return [
            f"model: {model.architecture}, {model.total_params / 1e9:.2f}B parameters ({model.decoder.layers} layers, "
            f"hidden {model.decoder.hidden}, vocabulary {model.vocab}), {cfg.model.params_dtype}",
            f"layout: {self.world_size} GPUs = TP {self.tp} x PP {self.pp} x DP {self.dp}, sequence parallel "
            f"{'on' if self.split.sp else 'off'}, {_gib(self.gpu)} GiB per GPU, "
            f"{'Transformer Engine' if self.kernels.flash_attention else 'local'} layers",
            f"micro-batch: {mb.tokens} tokens ({rows}), {mb.logit_rows} logit rows{images}; {self.samples} sequences "
            f"per DP rank per optimizer step; recompute {recompute}; loss {self.mode.name}",
        ]

    def phase(self, name: str) -> Phase:
        """The phase on the stage where it is largest (PP > 1: the first or the last)."""
        stages = [(True, True)] if self.pp == 1 else [(True, False), (False, True)]
        candidates = [getattr(self, name)(first, last) for first, last in stages]
        worst = max(candidates, key=lambda p: (bool(p.problem), p.total))
        if self.pp > 1:
            worst.stage = "first stage" if worst is candidates[0] else "last stage"
        return worst

    def _resident(self, first: bool, last: bool, grads_away: bool = False, optimizer_away: bool = False) -> list[Term]:
        n, e, dtype = self.model.stage_params(self.tp, self.pp, first, last), self.e, _DTYPE_NAMES[self.e]
        main = 4 if e < 4 else 0  # fp32 main weights next to 16-bit ones
        teacher_away = self.cfg.offload.teacher

        def term(name: str, nbytes: float, offloaded: bool) -> Term:
            return Term(name + ": offloaded", 0) if offloaded else Term(name, nbytes)

        return [
            Term(f"policy weights ({dtype}, this rank's shard)", n * e),
            term("gradient buffer (fp32)", n * 4, grads_away),
            term(f"optimizer shard (fp32{' main weights +' if main else ''} Adam m, v; 1/DP)", n * (main + 8) / self.dp,
                 optimizer_away),
            term(f"teacher snapshot ({dtype})", n * e, teacher_away) if self.teacher_kept
            else Term("teacher: the live policy", 0),
            Term("CUDA context, NCCL and library workspaces", CUDA_OVERHEAD_BYTES),
        ]  # fmt: skip

    def rollout(self, first: bool, last: bool) -> Phase:
        cfg, model = self.cfg, self.model
        share = cfg.rollout.gpu_memory_utilization * self.gpu
        weights = model.total_params * 2
        kv = max(share - weights - VLLM_RUNTIME_BYTES, 0)
        seq = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        one_sequence = model.kv_bytes_per_token * seq
        terms = self._resident(first, last, cfg.offload.grads, cfg.offload.optimizer)
        phase = Phase("rollout", terms + [Term("vLLM share (rollout.gpu_memory_utilization)", share)])
        phase.notes.append(f"vLLM share: bf16 weights {_gib(weights)} GiB + runtime {_gib(VLLM_RUNTIME_BYTES)} GiB + "
                           f"KV cache {_gib(kv)} GiB ({kv / one_sequence:.1f} sequences of {seq} tokens)")  # fmt: skip
        if kv < one_sequence:
            phase.problem = (f"vLLM's KV cache ({_gib(kv)} GiB) cannot hold one sequence of {seq} tokens "
                             f"({_gib(one_sequence)} GiB)")  # fmt: skip
        return phase

    def scoring(self, first: bool, last: bool) -> Phase:
        model, mb, e, tp = self.model, self.mb, self.e, self.tp
        terms = self._resident(first, last) + [Term("vLLM buffers kept while asleep", VLLM_ASLEEP_BYTES)]
        if self.teacher_kept and self.cfg.offload.teacher and self.mode.teacher_pass:
            copied = model.stage_params(tp, self.pp, first, last) * e
            terms.append(Term("teacher weights copied in for the teacher pass", copied))
        live = layer_live(model.decoder, self.split, self.kernels, e, mb.seq) * mb.tokens
        terms.append(Term("largest layer's live tensors (one micro-batch, no grad)", live))
        if first and mb.image_tokens:
            v = model.shape.vision
            patches = mb.image_tokens * v.spatial_merge_size**2
            largest = mb.largest_image_tokens * v.spatial_merge_size**2
            vision = patches * (model.patch_inputs * (4 + e) + v.hidden_size * e)  # pixels, their cast, embeddings
            vision += layer_live(model.vision, Split(tp, False), self.kernels, e, largest) * largest
            vision += mb.image_tokens * model.decoder.hidden * (1 + len(v.deepstack_visual_indexes)) * e
            terms.append(Term("pixels, patch embeddings, one image's ViT layer, merged features", vision))
        if last:
            logits = mb.logit_rows * model.vocab / tp * e
            terms.append(Term(f"logits of the response positions ({_DTYPE_NAMES[e]}, R x V/TP)", logits))
            terms.append(Term("log-prob kernel's fp32 chunks", _chunk_temps(mb.logit_rows, model.vocab, tp, 2)))
            if self.mode.teacher_logits:
                terms.append(Term("teacher distribution of one micro-batch (R x V/TP)", logits))
        return Phase("scoring", terms)

    def update(self, first: bool, last: bool) -> Phase:
        terms = self._resident(first, last) + [Term("vLLM buffers kept while asleep", VLLM_ASLEEP_BYTES)]
        stored, loss, layer = update_activations(
            self.model, self.split, self.kernels, self.e, self.mb, self.recompute,
            layers=self.model.decoder.layers // self.pp, in_flight=self.in_flight if first else 1, first=first,
            last=last, teacher_logits=self.mode.teacher_logits,
        )  # fmt: skip
        moments = sorted([(sum(t.bytes for t in loss), "loss", loss), (sum(t.bytes for t in layer), "layer", layer)],
                         key=lambda m: m[0])  # fmt: skip
        (other_bytes, other, _), (_, peak, peak_terms) = moments
        phase = Phase("update", terms + stored + peak_terms)
        if loss:
            phase.notes.append(f"the backward's peak is at the {peak} (terms above); the {other} moment needs "
                               f"{_gib(other_bytes)} GiB")  # fmt: skip
        return phase

    def sync(self, first: bool, last: bool) -> Phase:
        group = self.model.largest_group_params * self.e
        return Phase("sync", self._resident(first, last) + [
            Term("vLLM weights awake (bf16, KV cache asleep)", self.model.total_params * 2),
            Term("vLLM buffers kept while asleep", VLLM_ASLEEP_BYTES),
            Term("weight-sync bucket (rollout.weight_bucket_mb, or one larger layer)",
                 max(self.cfg.rollout.weight_bucket_mb * MIB, group)),
            Term("vLLM's reload of one layer + TP scratch", group),
        ])  # fmt: skip


def update_activations(model: Model, split: Split, kernels: Kernels, act_bytes: int, mb: MicroBatch,
                       recompute: Recompute, *, layers: int, in_flight: int = 1, first: bool = True, last: bool = True,
                       teacher_logits: bool = False) -> tuple[list[Term], list[Term], list[Term]]:  # fmt: skip
    """The update's activation terms of one stage: (stored for the backward, the loss moment, the
    layer moment). The peak is stored + the larger moment: the loss's logits are freed before the
    layers' backward (and their recomputation) starts."""
    dtype = _DTYPE_NAMES[act_bytes]
    stored_bytes, regroup = decoder_update(model.decoder, split, kernels, act_bytes, mb, recompute, layers)
    flight = f"{in_flight} micro-batches in flight" if in_flight > 1 else "one micro-batch"
    stored = [Term(f"decoder activations stored ({flight}, recompute {recompute.mode})", stored_bytes * in_flight)]
    if first and mb.image_tokens:
        stored.append(Term(f"ViT activations and pixels ({flight})",
                           vision_update(model, split, kernels, act_bytes, mb, recompute) * in_flight))  # fmt: skip
    loss = []
    if last:
        norms = 3 if model.decoder.rms_norm and not kernels.fused_norm else 2  # + x * rstd of torch's RMSNorm
        inputs = norms * model.decoder.hidden / split.seq_div * act_bytes * mb.tokens
        stored.append(Term("final norm and output layer inputs", inputs))
        vocab_local = model.vocab / split.tp
        logits = mb.logit_rows * vocab_local * act_bytes
        chunks = _chunk_temps(mb.logit_rows, model.vocab, split.tp, 4 if teacher_logits else 2)
        out_grad = vocab_local * model.decoder.hidden * act_bytes  # once the logits are freed
        loss = [Term(f"logits of the response positions ({dtype}, R x V/TP)", logits), Term("their gradient", logits),
                Term("loss kernels' fp32 chunks, or then the output layer's weight gradient",
                     max(chunks, out_grad))]  # fmt: skip
        if teacher_logits:
            loss.append(Term("teacher distribution of the micro-batch", logits))
    working = layer_backward_working(model.decoder, split, kernels, act_bytes, mb.seq) * mb.tokens
    layer = [Term("backward working set of one layer", working),
             Term("one weight gradient in flight (largest matrix / TP)",
                  model.largest_layer_linear / split.tp * act_bytes)]  # fmt: skip
    if regroup:
        group = min(recompute.num_layers, layers)
        layer.insert(0, Term(f"recomputed group ({group} layer(s), all activations)", regroup))
    return stored, loss, layer


# ------------------------------------------------------------------------------------ advice


def _replace(cfg, dotted: str, value):
    section, key = dotted.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})


def _advice(phase: str, cfg, world_size: int, gpu: int, hf_config: dict, planner: _Planner) -> str:
    """'set A or B': the first two knobs that alone make `phase` fit (per knob its first fitting
    value: the largest token budget, the largest vLLM share), tried in order of preference."""
    par, seq = cfg.parallel, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    changes = []
    if phase == "rollout":
        utils = [round(u / 20, 2) for u in range(19, 0, -1)]
        changes += [("offload.grads", True), ("offload.optimizer", True), ("offload.teacher", True)]
        changes += [("rollout.gpu_memory_utilization", u) for u in utils]
    else:
        if phase == "update":
            changes.append(("model.recompute", "full"))
        if phase in ("scoring", "update"):
            if par.tensor_model_parallel_size > 1:
                changes.append(("parallel.sequence_parallel", True))
            budgets = [seq << k for k in range(6, -1, -1) if seq << k < planner.mb.tokens]
            changes += [("trainer.max_tokens_per_microbatch", b) for b in budgets]
        if phase == "sync":
            changes.append(("rollout.weight_bucket_mb", 256))
        if phase != "scoring":
            changes.append(("offload.teacher", True))
        changes.append(("parallel.tensor_model_parallel_size", 2 * par.tensor_model_parallel_size))
    knobs: dict[str, object] = {}
    for key, value in changes:
        section, field_name = key.split(".")
        if key in knobs or getattr(getattr(cfg, section), field_name) == value:
            continue
        try:
            changed = plan(_replace(cfg, key, value), world_size, gpu, hf_config, kernels=planner.kernels,
                           with_advice=False)  # fmt: skip
        except ValueError:  # e.g. a TP that does not split the model
            continue
        if changed.fits(next(p for p in changed.phases if p.name == phase)):
            knobs[key] = str(value).lower() if isinstance(value, bool) else value
            if len(knobs) == 2:
                break
    if knobs:
        return "set " + " or ".join(f"{k}={v}" for k, v in knobs.items())
    return ("no single knob makes it fit: combine recompute, sequence parallelism, a smaller token budget and "
            "offloading, or raise TP / PP")  # fmt: skip


# ------------------------------------------------------------------------------------ entry points


def load_hf_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model config {p} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {p} is not valid JSON ({err})") from None


def check(cfg, world_size: int, gpu_memory_bytes: int, hf_config: dict | None = None) -> MemoryPlan:
    """The start-up guard: the plan of `cfg` (model.hf_dir/config.json unless `hf_config` is
    given) on `world_size` GPUs of `gpu_memory_bytes`; raises ValueError with one line naming the
    phase that cannot fit and the knob to turn."""
    if hf_config is None:
        hf_config = load_hf_config(Path(cfg.model.hf_dir) / "config.json")
    result = plan(cfg, world_size, gpu_memory_bytes, hf_config)
    failing = result.failing
    if failing:
        more = f" (also: {', '.join(p.name for p in failing[1:])})" if len(failing) > 1 else ""
        raise ValueError(result.problem_line(failing[0]) + more)
    return result
