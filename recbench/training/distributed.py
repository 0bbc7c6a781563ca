"""Multi-process training: TorchRec model parallelism for tables, data parallelism for the rest.

``torchrun --nproc-per-node N -m recbench.cli.train ... runtime.distributed=true`` runs one
process per rank. The trainer loop is unchanged; it talks to a *parallel strategy*:

* ``SingleProcess`` (the default): whole batches, mean loss, nothing to gather.
* ``ProcessGroupParallel``: every rank walks the same seeded global batch order and reads only
  its contiguous part of each batch (``RankIterator``); the model is wrapped by TorchRec's
  ``DistributedModelParallel`` (``wrap``), whose planner shards every
  ``FusedEmbeddingBagCollection`` a table-backed method holds (``FusedTables.collection``) and
  whose data-parallel wrapper replicates everything else with DDP (dense MLPs and the modules of
  custom-lookup methods). Evaluation gathers every rank's predictions, so AUC and log loss are the
  exact global ones. After training rank 0 alone gathers the tables, shard by shard
  (``unshard``), and runs the final evaluation on the whole model (deployable form, memory
  report, latency: ``on_main``) while the other ranks wait; its metrics are every rank's result.

Memory. The job builds the model inside ``building()`` (``tables.tables_on_meta``): table-backed
methods' ``FusedEmbeddingBagCollection``s are built on the meta device, TorchRec's sharder
allocates each rank's shards (weights and fused optimizer state) and ``FusedTables.reset_parameters``
fills them from its seeded per-block initialisation (``tables.seeded_uniform``), which gives one
process's values. A rank holds its plan's share of the tables (the plan and the bytes per rank are
logged: ``local_shard_bytes``); rank 0 holds the whole tables again for the final evaluation.

Exactness: the loss of rank r is ``sum_i w_i * bce_i * W / n`` over its rows (n rows in the
global batch, W ranks). DDP averages dense gradients over ranks and TorchRec divides the pooled
embedding gradients by W in its all-to-all backward (``comm_ops.GRADIENT_DIVISION``), so every
parameter gets the gradient of the global mean loss: the same update as one process with the
same global batch, up to float summation order.

Sharding types, the DMP wrapper and shard/whole-tensor moves are in ``recbench.training.sharding``.
Sparse (row-sparse gradient) parameters of custom-lookup methods are kept out of DDP, whose bucket
views cannot hold sparse tensors, and are all-reduced by a gradient hook instead.

Stages. Between two stages the trainer calls ``rebuild(model, fn)``: ``_release`` removes the
sparse-gradient hooks (their handles) and DMP's DDP (its reducer's autograd hooks go with it; that
it is really gone is checked, since a surviving reducer would all-reduce the same gradients a
second time), ``fn`` (the method's ``rebuild``) replaces the inner model's embedding, and ``wrap``
runs again: a new plan for any new table, a new DDP over the new set of replicated parameters and
hooks on the new sparse ones; the trainer then builds its optimizers as one process does. Tables
are not gathered for this: a sharded collection that survives the rebuild keeps its shards and its
fused optimizer state (as in one process, where the fused state also carries over), and ``fn``
sees it as TorchRec's ``ShardedFusedEmbeddingBagCollection``. Hooks, ``on_stage_end`` and search
stages run on every rank on identical replicas (same seed; a search stage's validation AUC is the
gathered global one); ``check_replicas`` compares every finished stage's result and every
replicated parameter and buffer across ranks (SHA-256 fingerprints) and raises ``RankDivergence``
naming what differs. What a module computes from "the batch" is kept equal to one process by
``recbench.methods.blocks.batch_part`` (per-sample random draws: this rank's rows of the global draw;
sums over the batch's lookups in ``extra_loss``: weighted by W; quantities a module computes from
the whole batch in its forward or backward, e.g. LPT's row updates, DPQ's batch-norm statistics,
CAFE's sketch: joined over ranks there) and ``concat_ranks`` (per-row values a hook needs from the
whole batch, e.g. DSL's regrow gradients). A resumed run replays the
rebuild chain through the same ``rebuild`` before loading each rank's checkpoint.

Limits: CPU processes with gloo only (the project pins FBGEMM's CPU build; the CUDA/NCCL path
is not wired: shards are allocated on CPU and batches stay on CPU); a hook may not swap the
embedding module inside a stage (``ShardedModel`` refuses it; the method's ``rebuild`` between
stages may), and a ``rebuild`` that reads or rewrites the weights of a table-backed method's
tables would see them sharded (no method does). Tables a method initialises itself (it reads or
writes ``FusedTables.weight`` while it is built: CCE, dedup, CAFE, ADAPT, AdaEmbed)
are built whole on every rank and copied into the shards (``load_shards``; the wrap logs how many
collections), and the modules of custom-lookup methods are replicated whole on every rank. The
final evaluation needs the whole model on rank 0 (one host's memory for the deployable form) and
takes one process's time there.
Each rank checkpoints its own shards (``checkpoint.rank<r>-of-<W>.pt``); a killed run resumes
when every rank's checkpoint is of the same step (same world size), else it restarts.

References: TorchRec ``DistributedModelParallel``, ``EmbeddingShardingPlanner``; PyTorch
``DistributedDataParallel``; docs/architecture.md ("Distributed training").
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recbench.datasets.batching import BatchIterator, RecBatch, make_batch
from recbench.methods.blocks.tables import FusedTables, tables_on_meta
from recbench.training.sharding import (DistributedSetupError, LocalShardOptimizer, RankDivergence, ShardedModel,
                                       SparseAwareDataParallel, all_reduce_sparse_gradients, check_sharding_types,
                                       fingerprint, fused_sharder, gather_to_main, load_shards, local_shard_bytes,
                                       sparse_parameters)

log = logging.getLogger(__name__)


@dataclass
class LocalBatch(RecBatch):
    """A rank's part of a global batch.

    Attributes:
        weights: (B_local,) 1 for real rows, 0 for the one padding row a rank gets when the global
            batch has fewer rows than there are ranks (every rank must join each collective).
        global_size: rows in the whole global batch (n).
        start: index of this part's first row in the global batch (its padding row is row 0).
    """

    weights: torch.Tensor = None
    global_size: int = 0
    start: int = 0


class SingleProcess:
    """One process: the trainer's defaults (whole batches, mean loss)."""

    rank, world_size, is_main = 0, 1, True

    def iterate(self, iterator: BatchIterator):
        return iterator

    def row_scale(self, batch: RecBatch) -> Optional[torch.Tensor]:
        """Per-row loss factors (B,), or None for the plain batch mean."""
        return None

    def placement(self, batch: RecBatch):
        """Context of a training forward and its regulariser: where ``batch`` sits in the global batch
        (``recbench.methods.blocks.batch_part``)."""
        return contextlib.nullcontext()

    def reduce_value(self, loss: torch.Tensor) -> float:
        return float(loss.detach())

    def samples(self, batch: RecBatch) -> int:
        return int(batch.labels.shape[0])

    def gather(self, iterator, labels: List[np.ndarray], outputs: Dict[str, List[np.ndarray]],
               targets: Dict[str, List[np.ndarray]]):
        """Per-batch prediction arrays of this process -> those of the whole split."""
        return labels, outputs, targets

    def unshard(self, model: nn.Module) -> nn.Module:
        return model

    def building(self):
        """Context of building the model (one process: nothing changes)."""
        return contextlib.nullcontext()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run by the main process alone, whose value every process returns."""
        return fn()

    def wrap(self, model: nn.Module, method, sharding_types=None) -> nn.Module:
        return model

    def rebuild(self, model: nn.Module, fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """``model`` with its embedding module replaced by ``fn(model.embedding)`` (between stages)."""
        model.embedding = fn(model.embedding)
        return model

    def check_replicas(self, model: nn.Module, result: Dict[str, Any], where: str) -> None:
        """Raise ``RankDivergence`` unless every rank holds the same ``result`` and replicated state."""

    def first(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def concat_ranks(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Each tensor concatenated (dim 0) over the ranks in rank order: the whole batch's rows of
        per-row values a hook needs (e.g. DSL's lookup gradients); unchanged in one process."""
        return list(tensors)

    def broadcast(self, value: Any) -> Any:
        return value


class RankIterator:
    """The rank's contiguous part of every batch of ``base`` (same order on every rank).

    ``len()`` and ``epoch(epoch, start_batch)`` mirror ``BatchIterator``; each yielded
    ``LocalBatch`` holds rows ``np.array_split(batch_rows, W)[rank]``.
    """

    def __init__(self, base: BatchIterator, rank: int, world_size: int):
        self.base, self.rank, self.world_size = base, int(rank), int(world_size)
        self.keep_masks: List[np.ndarray] = []  # per yielded batch: which local rows are real

    def __len__(self) -> int:
        return len(self.base)

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[LocalBatch]:
        self.keep_masks = []
        for rows in self.base.epoch_rows(epoch, start_batch):
            parts = np.array_split(rows, self.world_size)
            part, start = parts[self.rank], sum(len(p) for p in parts[:self.rank])
            weights = torch.ones(len(part))
            if len(part) == 0:  # fewer rows than ranks: one zero-weight row keeps the collectives aligned
                part, weights, start = rows[:1], torch.zeros(1), 0
            self.keep_masks.append(weights.numpy() > 0)
            batch = make_batch(self.base.spec, self.base.split, part)
            yield LocalBatch(dense_features=batch.dense_features, sparse_features=batch.sparse_features,
                             labels=batch.labels, targets=batch.targets, weights=weights, global_size=len(rows),
                             start=start)

    def __iter__(self) -> Iterator[LocalBatch]:
        return self.epoch(0)


class ProcessGroupParallel(SingleProcess):
    """Strategy of one rank in an initialised default process group."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device("cpu")
        self._collections: List[Tuple[nn.Module, Tuple[list, type, dict]]] = []  # sharded -> its unsharded config
        self._hooks: List[Any] = []  # handles of the sparse-gradient hooks of the current wrap
        self._sharding_types: Optional[Sequence[str]] = None

    # ---------------------------------------------------------------- data
    def iterate(self, iterator: BatchIterator) -> RankIterator:
        return RankIterator(iterator, self.rank, self.world_size)

    def row_scale(self, batch: LocalBatch) -> torch.Tensor:
        return batch.weights * (self.world_size / batch.global_size)

    def placement(self, batch: LocalBatch):
        from recbench.methods.blocks import batch_part

        return batch_part.placement(batch.start, batch.global_size, self.world_size)

    def reduce_value(self, loss: torch.Tensor) -> float:
        total = loss.detach().clone().reshape(1).double()
        dist.all_reduce(total)
        return float(total) / self.world_size

    def samples(self, batch: LocalBatch) -> int:
        return int(batch.global_size)

    def gather(self, iterator: "RankIterator", labels, outputs, targets):
        """Every rank's real rows, batch by batch in rank order: the split's rows in their order."""
        keep = iterator.keep_masks
        local = ([x[m] for x, m in zip(labels, keep)],
                 {k: [x[m] for x, m in zip(v, keep)] for k, v in outputs.items()},
                 {k: [x[m] for x, m in zip(v, keep)] for k, v in targets.items()})
        everyone: List[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, local)

        def join(parts_per_rank: List[List[np.ndarray]]) -> List[np.ndarray]:
            return [np.concatenate([parts[b] for parts in parts_per_rank]) for b in range(len(parts_per_rank[0]))]

        return (join([r[0] for r in everyone]),
                {k: join([r[1][k] for r in everyone]) for k in outputs},
                {k: join([r[2][k] for r in everyone]) for k in targets})

    def concat_ranks(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        everyone: List[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, [t.detach().cpu() for t in tensors])
        return [torch.cat([parts[i] for parts in everyone]) for i in range(len(tensors))]

    def _run_on_main(self, fn: Callable[[], Any], wait: timedelta) -> Any:
        """Rank 0 runs ``fn`` while the others wait (up to ``wait``, not the process group's timeout:
        a first preparation or a final evaluation can take hours); its value on rank 0, None
        elsewhere. A failure on rank 0 is raised on every rank."""
        error, value = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as exc:  # re-raised below, after telling the other ranks
                error = exc
        dist.monitored_barrier(timeout=wait, wait_all_ranks=True)
        failed = self.broadcast(f"{type(error).__name__}: {error}" if error is not None else None)
        if error is not None:
            raise error
        if failed is not None:
            raise DistributedSetupError(f"rank 0 failed: {failed}")
        return value

    def first(self, fn: Callable[[], Any], wait: timedelta = timedelta(days=1)) -> Any:
        """Rank 0 runs ``fn`` (e.g. building a dataset cache) while the others wait, then the others
        run it (reading the cache). A failure on rank 0 is raised on every rank."""
        value = self._run_on_main(fn, wait)
        return value if self.is_main else fn()

    def on_main(self, fn: Callable[[], Any], wait: timedelta = timedelta(days=1)) -> Any:
        """Rank 0 runs ``fn`` (the final evaluation on the model ``unshard`` gathered there) while the
        others wait; every rank returns rank 0's value. A failure on rank 0 is raised on every rank."""
        return self.broadcast(self._run_on_main(fn, wait))

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # --------------------------------------------------------------- model
    def building(self):
        """Context of building the model (and of a ``rebuild``): ``FusedTables`` are built on the
        meta device, so that ``wrap`` allocates only this rank's shards."""
        return tables_on_meta()

    def wrap(self, model: nn.Module, method, sharding_types=None) -> ShardedModel:
        """Shard ``model``'s fused tables across ranks (planner-chosen) and replicate the rest.

        A collection on the meta device (built inside ``building``) gets its shards from TorchRec's
        sharder and their values from its ``FusedTables.reset_parameters`` (one process's values,
        drawn shard by shard); a collection built whole is copied into its shards. Collections
        already sharded (a model re-wrapped by ``rebuild``) are kept as they are, with their shards
        and fused optimizer state; only plain ``FusedEmbeddingBagCollection``s are planned and
        sharded."""
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        self._sharding_types = sharding_types
        plain = {path: m for path, m in model.named_modules() if isinstance(m, FusedEmbeddingBagCollection)}
        configs = {path: (m.embedding_bag_configs(), m.optimizer_type(), m.optimizer_kwargs())
                   for path, m in plain.items()}
        types = check_sharding_types(sharding_types)
        sharder = fused_sharder(types)
        topology = TopologyFactory.create_topology(
            TrainerConfig(world_size=self.world_size,
                          local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))),
            kernel_config=KernelConfig(compute_device=self.device.type))
        planner = EmbeddingShardingPlanner(topology=topology)
        plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
        owners = {path: model.get_submodule(path.rpartition(".")[0]) if "." in path else model for path in plain}
        on_meta = {path for path, m in plain.items() if any(p.device.type == "meta" for p in m.parameters())}
        for path in on_meta:
            if not isinstance(owners[path], FusedTables):
                raise DistributedSetupError(f"{path} is on the meta device but not held by a FusedTables, "
                                            "which alone can initialise its shards")
        initial = {path: {k: v.detach().clone() for k, v in m.state_dict().items()}
                   for path, m in plain.items() if path not in on_meta}
        sparse = sparse_parameters(model)
        dmp = DistributedModelParallel(model, device=self.device, plan=plan, sharders=[sharder],
                                       data_parallel_wrapper=SparseAwareDataParallel(sparse))
        for path in plain:  # the sharded kernels start from FBGEMM's own init otherwise
            sharded, owner = model.get_submodule(path), owners[path]
            if path in on_meta:
                owner.reset_parameters()  # this rank's shards of the seeded initialisation
            else:
                load_shards(sharded, initial.pop(path))
            self._collections.append((sharded, configs[path]))
            owner.fused_optimizer = lambda sharded=sharded: LocalShardOptimizer(sharded.fused_optimizer)
        self._hooks = all_reduce_sparse_gradients(sparse, self.world_size)
        held: List[Any] = [None] * self.world_size
        dist.all_gather_object(held, sum(local_shard_bytes(model.get_submodule(path).state_dict()) for path in plain))
        if self.is_main and plain:
            log.info("sharding plan over %d ranks:\n%s", self.world_size, plan)
            log.info("table shards per rank (MB): %s; %d of %d collections allocated as shards only, the others "
                     "built whole and copied (their method initialises them itself)",
                     ", ".join(f"{b / 2 ** 20:.1f}" for b in held), len(on_meta), len(plain))
        elif self.is_main:
            log.info("sharding plan over %d ranks: (no %stables to shard)", self.world_size,
                     "new " if self._collections else "")
        return ShardedModel(dmp, model)

    def rebuild(self, model: nn.Module, fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Between stages: drop DMP/DDP and the sparse-gradient hooks (``_release``), replace the
        inner model's embedding by ``fn(embedding)`` and wrap again (a new plan for new tables, a
        new DDP over the new set of replicated parameters, hooks on the new sparse parameters).

        Tables are not gathered: a collection that survives the rebuild stays sharded, with its
        shards and fused optimizer state (one process keeps that state across stages too), and
        ``fn`` sees it as TorchRec's ``ShardedFusedEmbeddingBagCollection``. Every rank applies
        ``fn`` to identical replicated state (checked by ``check_replicas`` before each rebuild), so
        every rank builds the same module."""
        if not isinstance(model, ShardedModel):
            return super().rebuild(model, fn)
        inner = self._release(model)
        with self.building():  # new tables: this rank's shards only
            inner.embedding = fn(inner.embedding)
        return self.wrap(inner, None, self._sharding_types)

    def _release(self, model: ShardedModel) -> nn.Module:
        """The inner model of ``model`` without DMP, DDP and the sparse-gradient hooks.

        A DDP reducer keeps its autograd hooks until it is destroyed: a live one next to a new
        DDP would all-reduce (and average) the same gradients twice, so its disappearance is
        checked (weak reference) and a leftover reference is an error."""
        from torch.nn.parallel import DistributedDataParallel

        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        inner, dmp = model.inner, model.dmp
        ddp = dmp._dmp_wrapped_module
        alive = weakref.ref(ddp) if isinstance(ddp, DistributedDataParallel) else None
        object.__setattr__(model, "inner", None)
        dmp._modules.pop("_dmp_wrapped_module", None)
        del ddp, dmp, model
        gc.collect()
        if alive is not None and alive() is not None:
            raise DistributedSetupError(
                "the previous DistributedDataParallel wrapper is still referenced after a stage: its gradient "
                "hooks would average every replicated gradient a second time")
        inner.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
        return inner

    def unshard(self, model: nn.Module) -> nn.Module:
        """The inner model of ``model`` without DMP, DDP and the gradient hooks; on rank 0, every
        sharded collection replaced, in place, by an unsharded ``FusedEmbeddingBagCollection``
        holding the whole tables, received one collection and one shard at a time
        (``gather_to_main``); the other ranks keep their shards (they only send them). The tables'
        optimizer state is not carried over (training is over; the new collection allocates its
        own, so memory reports stay exact)."""
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        if not isinstance(model, ShardedModel):
            return model
        inner = self._release(model)
        where = {id(m): path for path, m in inner.named_modules()}
        for sharded, (configs, optimizer_type, optimizer_kwargs) in self._collections:
            path = where.get(id(sharded))
            if path is None:  # dropped by a rebuild
                continue
            plain = None
            if self.is_main:
                with torch.random.fork_rng(devices=[]):  # FBGEMM's own init draws; one process draws nothing here
                    plain = FusedEmbeddingBagCollection(tables=configs, optimizer_type=optimizer_type,
                                                        optimizer_kwargs=optimizer_kwargs, device=self.device)
            state = sharded.state_dict()
            with torch.no_grad():
                for config in configs:
                    gather_to_main(state[f"embedding_bags.{config.name}.weight"],
                                   plain.embedding_bags[config.name].weight if plain is not None else None)
            if plain is not None:
                parent, _, attr = path.rpartition(".")
                owner = inner.get_submodule(parent) if parent else inner
                setattr(owner, attr, plain)
                owner.__dict__.pop("fused_optimizer", None)  # back to the class's own fused_optimizer()
        self._collections = []
        return inner

    def check_replicas(self, model: nn.Module, result: Dict[str, Any], where: str) -> None:
        """Every rank must end a stage with the same result and the same replicated state (every
        parameter and buffer except this rank's table shards): hooks, ``on_stage_end`` and search
        stages run on every rank, and the next stage's module is built from them. Fingerprints
        (SHA-256 of every entry) are compared; a difference raises ``RankDivergence`` naming the
        entries that differ, instead of training on silently different replicas."""
        state = {f"state/{k}": v for k, v in model.state_dict().items() if ".__shard" not in k}
        mine = {**{f"result/{k}": fingerprint(v) for k, v in result.items()},
                **{k: fingerprint(v) for k, v in state.items()}}
        everyone: List[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        differ = sorted(k for k in set().union(*everyone) if len({str(r.get(k)) for r in everyone}) > 1)
        if differ:
            shown = ", ".join(differ[:8]) + (f" (+{len(differ) - 8} more)" if len(differ) > 8 else "")
            raise RankDivergence(f"{where}: the {self.world_size} ranks disagree on {shown}; every rank must compute "
                                 "the same stage result and replicated state (a hook or search stage that reads "
                                 "only this rank's part of a batch cannot run distributed as it is)")


def rank_checkpoint(path: Path) -> Path:
    """This rank's checkpoint file next to ``path`` (``path`` itself in one process).

    Ranks save at the same steps, but a kill can land between two ranks' writes: unless every
    rank holds a checkpoint of the same step, all of them are removed (the run restarts) so that
    no rank resumes from a different point than the others."""
    parallel = current()
    if parallel.world_size == 1:
        return path
    mine = path.with_name(f"{path.stem}.rank{parallel.rank}-of-{parallel.world_size}{path.suffix}")
    step = -1
    if mine.is_file():
        try:
            step = int(torch.load(mine, map_location="cpu", weights_only=True)["progress"]["global_step"])
        except Exception:  # unreadable: as if missing
            step = -2
    steps: List[Any] = [None] * parallel.world_size
    dist.all_gather_object(steps, step)
    if len(set(steps)) != 1 or steps[0] < 0:
        if any(s >= 0 for s in steps) and parallel.is_main:
            log.warning("rank checkpoints are at different steps %s: restarting the run", steps)
        mine.unlink(missing_ok=True)
    return mine


def check_settings(distributed: bool, sharding_types: Optional[Sequence[str]]) -> None:
    """``runtime.distributed`` / ``runtime.sharding_types`` of a job, checked before anything runs."""
    if sharding_types is not None:
        check_sharding_types(sharding_types)
    if distributed and not dist.is_initialized():
        raise DistributedSetupError(
            "runtime.distributed=true but this process is not part of a process group: run "
            "`torchrun --nproc-per-node N -m recbench.cli.train ... runtime.distributed=true`")
    if not distributed and dist.is_initialized() and dist.get_world_size() > 1:
        raise DistributedSetupError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()}: "
                                    "set runtime.distributed=true (or launch one process)")


_ACTIVE: SingleProcess = SingleProcess()


def current() -> SingleProcess:
    """The strategy of this process (``SingleProcess`` outside a distributed session)."""
    return _ACTIVE


@contextlib.contextmanager
def session(enabled: bool, timeout_minutes: float = 30.0) -> Iterator[SingleProcess]:
    """Join the torchrun process group for the duration of one run (``enabled``), else no-op.

    On success every rank frees its model, meets at a barrier and destroys the group (an exit-time
    abort was seen when the group was destroyed while another rank still held sharded modules);
    on failure the group is destroyed without a barrier and torchrun stops the other ranks."""
    global _ACTIVE
    if not enabled:
        yield _ACTIVE
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise DistributedSetupError(
            f"runtime.distributed=true needs a launcher that sets {', '.join(missing)}: run "
            "`torchrun --nproc-per-node N -m recbench.cli.train ... runtime.distributed=true`")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_minutes))
    _ACTIVE = ProcessGroupParallel()
    ok = False
    try:
        yield _ACTIVE
        ok = True
    finally:
        _ACTIVE = SingleProcess()
        gc.collect()
        if owned:
            if ok:
                dist.barrier()
            dist.destroy_process_group()
