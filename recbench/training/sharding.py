"""TorchRec sharding on CPU/gloo: which sharding types the planner may choose, the model wrapper
around ``DistributedModelParallel``, the data-parallel wrapper that keeps row-sparse parameters out
of DDP (their gradients are all-reduced by hooks), and moving state between whole tensors and this
rank's shards (checkpoints, the final model gathered on rank 0). Used by ``recbench.training.distributed``.

Sharding types (checked against TorchRec 1.8): ``FusedEmbeddingBagCollectionSharder`` offers
data_parallel, table_wise, column_wise and table_column_wise on CPU (row_wise and
table_row_wise on CUDA only). data_parallel is not offered here: it replicates the table with a
dense kernel whose whole-table gradient DDP all-reduces (dense table gradients are not allowed:
docs/architecture.md, "Performance"), and on CPU TorchRec 1.8 builds that DDP with
``device_ids=[cpu]``, which torch rejects.

References: TorchRec ``DistributedModelParallel``, ``FusedEmbeddingBagCollectionSharder``; PyTorch
``DistributedDataParallel``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.fused_embeddingbag import FusedEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel

#: sharding types the planner may choose on CPU (TorchRec 1.8's fused sharder, data_parallel excluded)
SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
_NOT_OFFERED = {
    "data_parallel": "it replicates the table with a dense kernel whose whole-table gradient is all-reduced "
                     "(dense table gradients are not allowed), and TorchRec 1.8 cannot build it on CPU",
    "row_wise": "TorchRec 1.8 offers it on CUDA only",
    "table_row_wise": "TorchRec 1.8 offers it on CUDA only",
}


class DistributedSetupError(RuntimeError):
    """A distributed run that cannot start: the message says what is missing or not allowed."""


def check_sharding_types(names: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The sharding types the planner may choose from (None: every type offered on CPU)."""
    allowed = SHARDING_TYPES
    if names is None:
        return allowed
    chosen = tuple(str(n) for n in names)
    if not chosen:
        raise DistributedSetupError("runtime.sharding_types is empty; allowed: " + ", ".join(allowed))
    for name in chosen:
        if name not in allowed:
            why = f" ({_NOT_OFFERED[name]})" if name in _NOT_OFFERED else ""
            raise DistributedSetupError(
                f"runtime.sharding_types: {name!r} is not available{why}; "
                f"allowed: {', '.join(allowed)}")
    return chosen



class ShardedModel(nn.Module):
    """The trainer's view of a ``DistributedModelParallel`` model.

    forward(dense (B, num_dense), sparse KJT) -> logits (B,) through DMP (sharded lookups +
    DDP); ``embedding``, ``state_dict`` and ``load_state_dict`` are the wrapped model's (sharded
    tables appear as ``ShardedTensor``s holding this rank's shards).
    """

    def __init__(self, dmp: nn.Module, model: nn.Module):
        super().__init__()
        self.dmp = dmp
        object.__setattr__(self, "inner", model)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "embedding":
            raise DistributedSetupError(
                "a distributed run replaces the embedding module only between stages, through the method's "
                "rebuild (the trainer calls ProcessGroupParallel.rebuild, which re-wraps the model); a hook that "
                "swaps the module inside a stage needs one process")
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # embedding, extra_loss, task_weights, ...: the wrapped model's
            return getattr(self.inner, name)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        return self.dmp(dense, sparse)

    def state_dict(self, *args, **kwargs):
        """The wrapped model's state with each sharded table as this rank's shards (plain tensors,
        keys ``<key>.__shard<i>``): what best-state snapshots and per-rank checkpoints hold."""
        return localize(self.inner.state_dict(*args, **kwargs))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Inverse of ``state_dict``: shards are copied in place, the rest loaded normally."""
        return self.inner.load_state_dict(restore(self.inner.state_dict(), state_dict), strict=strict)


class RankDivergence(RuntimeError):
    """Ranks of a distributed run hold different replicas of what must be identical."""


def fingerprint(value: Any) -> str:
    """SHA-256 of a (nested) stage-result value or tensor, bit-exact for floats."""
    digest = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, np.ndarray):
            digest.update(f"A{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes())
        elif isinstance(v, dict):
            for key in sorted(v, key=str):
                digest.update(f"K{key!r}".encode())
                feed(v[key])
        elif isinstance(v, (list, tuple)):
            digest.update(f"L{len(v)}".encode())
            for item in v:
                feed(item)
        elif isinstance(v, float):
            digest.update(b"F" + np.float64(v).tobytes())
        else:
            digest.update(f"V{type(v).__name__}{v!r}".encode())

    feed(value)
    return digest.hexdigest()


def fused_sharder(types: Sequence[str]):
    class Sharder(FusedEmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> List[str]:
            return [t for t in super().sharding_types(compute_device_type) if t in types]

    return Sharder()


def sparse_parameters(model: nn.Module) -> List[nn.Parameter]:
    embedding = getattr(model, "embedding", None)
    if embedding is None or not hasattr(embedding, "param_groups"):
        return []
    return [p for group in embedding.param_groups() if group.kind == "sparse" for p in group.params]


class SparseAwareDataParallel:
    """DMP's data-parallel wrapper: DDP over every unsharded parameter except row-sparse ones."""

    def __init__(self, sparse: Sequence[nn.Parameter]):
        self.sparse_ids = {id(p) for p in sparse}

    def wrap(self, dmp, env, device) -> None:
        module = dmp._dmp_wrapped_module
        ignore = set(DistributedModelParallel._sharded_parameter_names(module))
        ignore |= {name for name, p in module.named_parameters() if id(p) in self.sparse_ids}
        if not (set(dict(module.named_parameters())) - ignore):
            return
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        dmp._dmp_wrapped_module = DistributedDataParallel(
            module, device_ids=None if device.type == "cpu" else [device], process_group=env.process_group,
            broadcast_buffers=False, static_graph=True, gradient_as_bucket_view=False)


def all_reduce_sparse_gradients(params: Sequence[nn.Parameter], world_size: int) -> List[Any]:
    """Average row-sparse gradients over ranks as soon as each is accumulated (same order on every
    rank: every rank runs the same backward graph). Ranks start from identical values (same seed).
    Returns the hooks' handles (removed when the model is released, so that a parameter that
    survives a rebuild is never averaged twice)."""
    handles = []
    for param in params:
        def hook(p: torch.Tensor) -> None:
            grad = p.grad.coalesce() if p.grad.is_sparse else p.grad
            work = dist.all_reduce(grad, async_op=True)
            work.wait()
            p.grad = work.result()[0] / world_size if grad.is_sparse else grad / world_size
        handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles


def load_shards(sharded: nn.Module, full_state: Dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into this rank's shards of a sharded module's state."""
    with torch.no_grad():
        for key, value in sharded.state_dict().items():
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                                  shard.metadata.shard_sizes))
                    shard.tensor.copy_(full_state[key][index])
            else:
                value.copy_(full_state[key])


def localize(state: Dict[str, Any]) -> Dict[str, Any]:
    """A (nested) state dict with every ShardedTensor replaced by its local shard tensors."""
    out: Dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            for i, shard in enumerate(value.local_shards()):
                out[f"{key}.__shard{i}"] = shard.tensor
        elif isinstance(value, dict):
            out[key] = localize(value)
        else:
            out[key] = value
    return out


def restore(live: Dict[str, Any], saved: Dict[str, Any]) -> Dict[str, Any]:
    """Copy the local shards in ``saved`` (from ``localize``) into ``live``'s ShardedTensors in place;
    returns ``live`` with the other entries taken from ``saved`` (a state dict ready to load)."""
    out: Dict[str, Any] = {}
    with torch.no_grad():
        for key, value in live.items():
            if isinstance(value, ShardedTensor):
                for i, shard in enumerate(value.local_shards()):
                    shard.tensor.copy_(saved[f"{key}.__shard{i}"])
                out[key] = value
            elif isinstance(value, dict) and isinstance(saved.get(key), dict):
                out[key] = restore(value, saved[key])
            else:
                out[key] = saved[key] if key in saved else value
    return out


class LocalShardOptimizer:
    """A sharded collection's fused optimizer with ``state_dict``/``load_state_dict`` over this
    rank's shards (plain tensors: checkpoints load with ``weights_only=True``)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def state_dict(self) -> Dict[str, Any]:
        return localize(self.optimizer.state_dict())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        restore(self.optimizer.state_dict(), state)  # in place: the live state tensors are the kernels'


def gather_to_main(value: Any, out: Optional[torch.Tensor]) -> None:
    """Rank 0 receives every shard of the ShardedTensor ``value`` into ``out`` (the whole tensor,
    ``None`` on the other ranks), one shard at a time (point-to-point, in the order of the tensor's
    shard metadata); every other rank sends the shards it holds. No rank holds more than the whole
    tensor on rank 0 plus one shard in transit."""
    rank = dist.get_rank()
    local = {tuple(s.metadata.shard_offsets): s.tensor for s in value.local_shards()}
    for meta in value.metadata().shards_metadata:
        owner, offsets = meta.placement.rank(), tuple(meta.shard_offsets)
        if rank == 0:
            index = tuple(slice(o, o + s) for o, s in zip(meta.shard_offsets, meta.shard_sizes))
            if owner == 0:
                out[index] = local[offsets].detach()
            else:
                received = torch.empty(meta.shard_sizes, dtype=out.dtype)
                dist.recv(received, src=owner)
                out[index] = received
        elif owner == rank:
            dist.send(local[offsets].detach().contiguous(), dst=0)


def local_shard_bytes(state: Dict[str, Any]) -> int:
    """Bytes of the shards this rank holds of every ShardedTensor in a (nested) state dict, e.g. a
    sharded collection's weights (``state_dict()``) or its fused optimizer's state."""
    total = 0
    for value in state.values():
        if isinstance(value, ShardedTensor):
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
        elif isinstance(value, dict):
            total += local_shard_bytes(value)
    return total
