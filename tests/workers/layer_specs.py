"""torchrun worker (2 ranks, TP2, gloo): the local and the Transformer Engine layer specs give the
same checkpoint, for every model of SPEC. Writes a JSON report on rank 0.

    torchrun --nproc-per-node 2 tests/workers/layer_specs.py SPEC.json REPORT.json
SPEC: {"models": {name: HF folder}, "scratch": directory for the checkpoints}

Transformer Engine is not installed here, so the TE spec's model is built with stand-ins for TE's
modules: Megatron-Core's own TE layer specs (their TE classes swapped for the stand-ins) and its
own TransformerLayer / attention / MLP / GPTModel code; a stand-in has the parameter names TE's
module registers (transformer_engine/pytorch/module/{linear,layernorm_linear}.py, ops/basic/
{rmsnorm,layer_norm}.py), TE's `_extra_state`, and the sharding of Megatron's TE wrapper
(megatron/core/extensions/transformer_engine.py: LayerNormColumnParallelLinear shards
weight/bias along 0, RowParallelLinear weight along 1, DotProductAttention saves nothing unless
softmax_type is "learnable", TENorm has no sharded_state_dict of its own), and TE's
DotProductAttention's load hook that forgives its missing `_extra_state`.
"""

import contextlib
import dataclasses
import json
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import Parameter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_rlsd.checkpoint import dist as ckpt  # noqa: E402
from megatron_rlsd.models.registry import build_pipeline_stage, hf_mapping  # noqa: E402
from megatron_rlsd.parallel import ParallelConfig, init_distributed, seed_model_parallel_rng  # noqa: E402


class _TEModule(torch.nn.Module):
    """Every TE module keeps FP8 metadata as `_extra_state` (an empty tensor without FP8)."""

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass


class _Linear(_TEModule):
    """te.pytorch.Linear / LayerNormLinear parameters; Megatron's TE wrapper's sharding."""

    norm = False
    tp_axes: dict = {}

    def __init__(self, input_size, output_size, *, config, bias, tp_group, **_):
        super().__init__()
        tp = tp_group.size()
        self._tp_group = tp_group
        if self.norm:  # LayerNormLinear: layer_norm_weight, and layer_norm_bias unless RMSNorm
            self.layer_norm_weight = Parameter(torch.empty(input_size))
            if config.normalization != "RMSNorm":
                self.layer_norm_bias = Parameter(torch.empty(input_size))
        column = self.tp_axes.get("weight") == 0
        out_size, in_size = (output_size // tp, input_size) if column else (output_size, input_size // tp)
        self.weight = Parameter(torch.empty(out_size, in_size))
        if bias:  # TE registers no bias parameter without one
            self.bias = Parameter(torch.empty(out_size))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, self.tp_axes,
                                                   sharded_offsets, tp_group=self._tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])  # fmt: skip


class _LayerNormColumnParallelLinear(_Linear):
    norm, tp_axes = True, {"weight": 0, "bias": 0}


class _RowParallelLinear(_Linear):
    tp_axes = {"weight": 1}


class _DotProductAttention(_TEModule):
    def __init__(self, *args, **kwargs):
        super().__init__()
        # as TE's: its own `_extra_state` is never a missing key on load (Megatron saves none)
        self.register_load_state_dict_post_hook(_forgive_core_attention_extra_state)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}  # Megatron's wrapper: nothing without a learnable softmax offset


def _forgive_core_attention_extra_state(module, incompatible_keys):
    for key in [k for k in incompatible_keys.missing_keys if "core_attention._extra_state" in k]:
        incompatible_keys.missing_keys.remove(key)


class _Norm(_TEModule):
    """te.pytorch.RMSNorm / LayerNorm: weight (+ bias), and `_extra_state`."""

    def __init__(self, config, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = Parameter(torch.empty(hidden_size))
        if config.normalization == "LayerNorm":
            self.bias = Parameter(torch.empty(hidden_size))


def _swap(spec, standins):
    """`spec` with every TE class of its module tree replaced by its stand-in."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_swap(spec.module, standins), submodules=_swap(spec.submodules, standins))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _swap(getattr(spec, f.name), standins) for f in dataclasses.fields(spec)})
    return next((standin for te, standin in standins if spec is te), spec)


@contextlib.contextmanager
def te_standins():
    """Megatron-Core's TE specs build (with stand-ins) although TE is not installed."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.vision import vit_layer_specs
    from megatron.core.transformer import transformer_block

    standins = [(te_ext.TELayerNormColumnParallelLinear, _LayerNormColumnParallelLinear),
                (te_ext.TERowParallelLinear, _RowParallelLinear), (te_ext.TEDotProductAttention, _DotProductAttention),
                (te_ext.TENorm, _Norm)]  # fmt: skip
    gpt_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    vit_spec = vit_layer_specs.get_vit_layer_with_transformer_engine_spec
    saved = (provider.is_te_min_version, transformer_block.LayerNormImpl)
    gpt_layer_specs.TESpecProvider = provider.TESpecProvider  # imported there only when TE imports
    provider.is_te_min_version = lambda *a, **k: True  # TE >= 1.9: TENorm for the q/k norms
    transformer_block.LayerNormImpl = _Norm  # with TE installed, the final norm is a TENorm
    gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec = lambda **kw: _swap(gpt_spec(**kw), standins)
    vit_layer_specs.get_vit_layer_with_transformer_engine_spec = lambda: _swap(vit_spec(), standins)
    try:
        yield
    finally:
        provider.is_te_min_version, transformer_block.LayerNormImpl = saved
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec = gpt_spec
        vit_layer_specs.get_vit_layer_with_transformer_engine_spec = vit_spec
        del gpt_layer_specs.TESpecProvider


def _build(hf_config, platform, use_te: bool, seed: int):
    """A stage with random values (stand-ins are not initialised; distinct seeds per build).
    Replicated tensors get the same values on every TP rank, split ones a different shard each."""
    from megatron.core import parallel_state as ps

    with te_standins() if use_te else contextlib.nullcontext():
        model, shape = build_pipeline_stage(hf_config, platform, use_te=use_te)
    mapping = hf_mapping(shape)
    with torch.no_grad():
        for name, p in model.named_parameters():
            canonical = mapping.canonical_name(name)
            shard = ps.get_tensor_model_parallel_rank() if mapping.tp_dim(canonical) is not None else 0
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{canonical}/{shard}".encode()))
            p.copy_(torch.randn(p.shape, generator=gen))
    return model, shape


def _entries(model) -> tuple[dict, set]:
    """({checkpoint key: this rank's shards as (global shape, offset, fragmentation)}, {object keys})."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    tensors, objects = {}, set()
    for entry in model.sharded_state_dict().values():
        if isinstance(entry, ShardedObject):
            objects.add(entry.key)
            continue
        # the fused [gate; up] fc1 is a factory: its built shards are what is saved
        shards = [entry]
        if isinstance(entry, ShardedTensorFactory):
            shards = entry.build_fn(entry.key, entry.data, entry.replica_id, None)
        for shard in shards:
            tensors.setdefault(shard.key, []).append((shard.global_shape, shard.global_offset, shard.axis_fragmentations))
    return {k: sorted(v) for k, v in tensors.items()}, objects


def _canonical(model, shape) -> dict:
    mapping = hf_mapping(shape)
    return {mapping.canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _round_trip(src, dst, shape, step_dir: Path) -> list[str]:
    """Save `src`, load into `dst`: the parameters (canonical names) where they now differ."""
    ckpt.save_model_weights(src, step_dir)
    ckpt.load_model_weights(dst, step_dir)
    a, b = _canonical(src, shape), _canonical(dst, shape)
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def main(spec_path, report_path):
    spec = json.loads(Path(spec_path).read_text())
    platform = init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    seed_model_parallel_rng(1234)
    report = {}
    for name, hf_dir in spec["models"].items():
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
        local, shape = _build(hf_config, platform, use_te=False, seed=1)
        te, _ = _build(hf_config, platform, use_te=True, seed=2)
        te_saved, _ = _build(hf_config, platform, use_te=True, seed=3)
        (lt, lo), (tt, to) = _entries(local), _entries(te)
        scratch = Path(spec["scratch"]) / name
        report[name] = {
            "tensors": len(lt),
            "vision_tensors": sum(k.startswith("vision_model.") for k in lt),
            "tensors_only_local": sorted(lt.keys() - tt.keys()),
            "tensors_only_te": sorted(tt.keys() - lt.keys()),
            "tensor_layouts_differ": sorted(k for k in lt.keys() & tt.keys() if lt[k] != tt[k]),
            "objects_only_local": sorted(lo - to),
            "objects_only_te": sorted(to - lo),
            "differ_local_to_te": _round_trip(local, te, shape, scratch / "from_local"),
            "differ_te_to_local": _round_trip(te_saved, local, shape, scratch / "from_te"),
        }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(gathered, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
