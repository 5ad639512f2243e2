"""Stream dense (TP=1/PP=1) tensors into, and out of, a Megatron `torch_dist` checkpoint.

`dist_checkpointing.save` needs the whole sharded state dict in memory. A converter for a 13B model
must not, so we let Megatron describe the checkpoint and let PyTorch's DCP writer pull the data:

1. Build the TP=1/PP=1 GPTModel on the `meta` device (no memory) and take its
   `sharded_state_dict()`: Megatron itself decides every key, layer axis, GLU split and
   `_extra_state` object, exactly as a training run at TP=1/PP=1 would save them.
2. Turn it into PyTorch DCP objects with Megatron's own translation (`mcore_to_pyt_state_dict`).
3. Save with DCP's `FileSystemWriter` (one thread, no copy-ahead: tensors are resolved one at a
   time, in plan order) and a planner whose `resolve_data` asks `dense_tensor(name)` for the
   tensor of one write item when the writer reaches it. Items are ordered layer by layer.

Peak memory is one dense tensor (plus whatever `dense_tensor` reads to build it, e.g. q, k and v
for the fused QKV), never the model. The result is an ordinary Megatron checkpoint: `metadata.json`,
`common.pt`, `.metadata`, `__0_0.distcp`, loadable by `dist_checkpointing.load` at any TP/PP.

Reading works the same way in reverse: a meta model gives the sharded state dict, we attach real
empty tensors to the entries of the names we want, and DCP fills just those (reading the stored
chunks they overlap). Both directions run in one process without collectives (`no_dist=True`),
so rank 0 of a larger job may call them alone. The caller must have set up parallel_state with
TP=1 and PP=1 (the converter does it in a single process).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import torch

from mgsr_megatron.config import ModelConfig
from mgsr_megatron.errors import UserError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def meta_model(cfg: ModelConfig):
    """The TP=1/PP=1 GPTModel with parameters on the meta device (shapes only, no memory)."""
    from megatron.core import parallel_state

    from mgsr_megatron.models import build_model

    if (parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1):
        raise RuntimeError("conversion needs parallel_state initialised with TP=1 and PP=1")
    # parameters created under torch.device("meta") stay there: build_model moves a model onto the GPU
    # only when its parameters are real (no memory, no GPU)
    with torch.device("meta"):
        return build_model(cfg, pre_process=True, post_process=True)


def layer_of(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every dense Megatron tensor name of this architecture and its shape (padded vocabulary)."""
    model = meta_model(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if isinstance(t, torch.Tensor) and not name.endswith("_extra_state")}


def _sharded_entries(cfg: ModelConfig):
    """(dense name -> ShardedTensor | [ShardedTensor] | ShardedObject | factory) of the meta model."""
    return meta_model(cfg).sharded_state_dict()


def write_checkpoint(cfg: ModelConfig, directory: Path, dense_tensor: Callable[[str], torch.Tensor],
                     on_layer: Callable[[str], None] | None = None) -> None:
    """Write a torch_dist checkpoint into the (existing, empty) `directory`.

    `dense_tensor(name)` returns the full TP=1 tensor of a dense Megatron name (shape as in
    `dense_shapes`, any dtype: it is cast to the dtype the model gives that tensor). `on_layer(label)`
    is called when the writer moves on to the next layer ("embedding", "layer 0", ..., "final").
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    sharded, common = save_preprocess(_sharded_entries(cfg), validate_access_integrity=False)
    # (checkpoint key, global offset) -> (dense name, the ShardedTensor describing that chunk)
    chunks: dict[tuple[str, tuple[int, ...]], tuple[str, ShardedTensor]] = {}
    for name, entry in sharded.items():
        for sh_ten in entry if isinstance(entry, list) else [entry]:
            if isinstance(sh_ten, ShardedTensor):
                chunks[(sh_ten.key, tuple(sh_ten.global_offset))] = (name, sh_ten)
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    pyt_state_dict = mcore_to_pyt_state_dict(flat, is_loading=False)

    cache: dict[str, torch.Tensor] = {}  # the last dense tensor (a GLU fc1 is written as two chunks)

    def chunk_data(key: str, offset: tuple[int, ...]) -> torch.Tensor:
        name, sh_ten = chunks[(key, offset)]
        if name not in cache:
            cache.clear()
            tensor = dense_tensor(name)
            if tuple(tensor.shape) != _dense_shape(sh_ten):
                raise UserError(f"internal: tensor '{name}' has shape {tuple(tensor.shape)}, "
                                f"the model expects {_dense_shape(sh_ten)}")
            # sh_ten.dtype, not params_dtype: Megatron keeps e.g. the torch norm weights in fp32
            cache[name] = tensor.to(sh_ten.dtype).contiguous()
        tensor = cache[name]
        p = sh_ten.prepend_axis_num
        for dim, (start, size) in enumerate(zip(sh_ten.global_offset[p:], sh_ten.local_shape)):
            tensor = tensor.narrow(dim, start, size)
        return tensor.reshape((1,) * p + tuple(sh_ten.local_shape)).clone()

    layer_labels = {}
    for (key, offset), (name, _) in chunks.items():
        layer = layer_of(name)
        layer_labels[(key, offset)] = "embedding" if name.startswith("embedding.") else (
            f"layer {layer}" if layer is not None else "final")
    order = {"embedding": -1, "final": 1 << 30}

    def rank_of(label: str) -> int:
        return order.get(label, int(label.split()[-1]) if label.startswith("layer") else 0)

    class StreamingSavePlanner(MCoreSavePlanner):
        """Orders write items layer by layer and produces each tensor only when it is written."""

        current = None

        def create_local_plan(self):
            plan = super().create_local_plan()
            items = sorted(plan.items, key=lambda item: rank_of(
                layer_labels.get((item.index.fqn, tuple(item.index.offset or ())), "final")))
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            key = (write_item.index.fqn, tuple(write_item.index.offset))
            label = layer_labels[key]
            if on_layer is not None and label != StreamingSavePlanner.current:
                StreamingSavePlanner.current = label
                on_layer(label)
            return chunk_data(*key)

    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1,
                                  per_thread_copy_ahead=0)
    dcp.save(pyt_state_dict, storage_writer=writer, no_dist=True,
             planner=StreamingSavePlanner(flatten_state_dict=False))
    torch.save(common, Path(directory) / "common.pt")
    strategy = get_default_save_sharded_strategy()
    save_config(CheckpointingConfig(strategy.backend, strategy.version), str(directory))


def _dense_shape(sh_ten) -> tuple[int, ...]:
    """The full TP=1 tensor one ShardedTensor belongs to (global shape without the layer axis)."""
    return tuple(sh_ten.global_shape[sh_ten.prepend_axis_num:])


def _without_layer_axis(sh_ten):
    """The same chunk with the layer axis made an ordinary axis of size 1.

    Megatron turns ShardedTensors with a prepended layer axis into PyTorch ShardedTensors that must
    list every chunk of the global grid; in a single process all of them count as local, so asking
    for one layer fails. Without the prepended axis Megatron uses its CheckpointableShardedTensor,
    which reads any sub-chunk. The stored data is the same global tensor either way.
    """
    p = sh_ten.prepend_axis_num
    return dataclasses.replace(
        sh_ten, data=sh_ten.data.reshape((1,) * p + tuple(sh_ten.local_shape)),
        local_shape=(1,) * p + tuple(sh_ten.local_shape), prepend_axis_num=0,
        allow_shape_mismatch=False)  # vocabulary sizes are checked: no silent zero-fill


class CheckpointReader:
    """Reads dense TP=1 tensors by name from a torch_dist checkpoint of any TP/PP layout."""

    def __init__(self, cfg: ModelConfig, directory: Path):
        self.cfg = cfg
        self.directory = Path(directory)
        self.model = meta_model(cfg)
        tensors = {name: t for name, t in self.model.state_dict().items()
                   if isinstance(t, torch.Tensor) and not name.endswith("_extra_state")}
        self.shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        self.dtypes = {name: t.dtype for name, t in tensors.items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.mapping import apply_factories
        from megatron.core.dist_checkpointing.strategies.torch import (
            MCoreLoadPlanner,
            _replace_state_dict_keys_with_sharded_keys,
            mcore_to_pyt_state_dict,
        )

        entries = self.model.sharded_state_dict()
        wanted, out = {}, {}
        for name in names:
            entry = entries[name]
            out[name] = torch.empty(self.shapes[name], dtype=self.dtypes[name])
            entry.data = out[name]  # a ShardedTensor, or the GLU fc1 factory that splits it
            wanted[name] = entry
        apply_factories(wanted)
        wanted = {name: [_without_layer_axis(t) for t in (v if isinstance(v, list) else [v])]
                  for name, v in wanted.items()}
        sh_tens = [t for v in wanted.values() for t in v]
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(wanted)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, is_loading=True)
        from mgsr_megatron.models.trust import describe_load_error, load_errors, safe_loading

        reader = dcp.FileSystemReader(str(self.directory))
        try:
            with safe_loading():  # .metadata through the allow-list unpickler, torch.load weights_only
                dcp.load(pyt_state_dict, storage_reader=reader, no_dist=True,
                         planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=sh_tens))
        except UserError:
            raise
        except KeyError as exc:
            with safe_loading():
                missing = sorted({t.key for t in sh_tens} - set(reader.read_metadata().state_dict_metadata))
            raise UserError(f"{self.directory}: checkpoint has no tensor(s) {', '.join(missing)}") from exc
        except load_errors() as exc:  # noqa: BLE001 - shape mismatches come back as CheckpointingException
            if "shape mismatch" in str(exc).lower():
                raise UserError(f"{self.directory}: {str(exc).splitlines()[0]}") from exc
            raise describe_load_error(self.directory, exc) from exc
        return out
