"""``mch``: TorchRec's MCH managed-collision embeddings against an independent port of its eviction.

The port (``PortMCH``, plain Python) restates the defining computation of pytorch/torchrec
``torchrec/modules/mc_modules.py`` (``MCHManagedCollisionModule.profile``/``_coalesce_history``/
``_update_and_evict``, ``LFU_EvictionPolicy``, ``DistanceLFU_EvictionPolicy``) at
a48cef79ebc333da92af1311c04b041ee21a8e75: every ``interval`` training batches the ids seen are
counted; owned ids' counts grow; the m best of {the slots in raw-id order (empty slots score 0, the
last slot never leaves), the new ids by count descending then id} by a stable descending sort keep
or take the slots; an id without a slot maps to the last slot.
"""
import io
from fractions import Fraction

import numpy as np
import pytest
import torch
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.base import InfeasibleBudget
from recbench.methods.mch import FIXED_BYTES, MCH, MCHEmbedding
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes

DIM = 8
TABLES = [TableSpec("a", 200), TableSpec("b", 50), TableSpec("bag", 80, pooling="mean", multi_hot=True)]
ROWS = {"a": 17, "bag": 9}  # "b" keeps one row per id (not managed)
INT64_MAX = 2 ** 63 - 1


class PortMCH:
    """Independent port of one MCH module's slot ownership (LFU or DistanceLFU)."""

    def __init__(self, slots: int, policy: str, interval: int, decay: float = 1.0):
        self.slots, self.policy, self.interval, self.decay = slots, policy, interval, decay
        self.owned = {}  # raw id -> [count, last_access]
        self.iter = self.last_eviction = 0
        self.history = []  # (id, iter) of the batches since the last eviction

    def score(self, count, last):
        if self.policy == "lfu":
            return Fraction(count)
        return Fraction(count) / Fraction(self.iter - last + 1) ** int(self.decay)

    def train_batch(self, ids):
        self.iter += 1
        self.history += [(int(i), self.iter) for i in ids]
        if self.iter - self.last_eviction == self.interval:
            self.evict()
            self.last_eviction, self.history = self.iter, []

    def evict(self):
        counts, last = {}, {}
        for i, it in self.history:
            counts[i] = counts.get(i, 0) + 1
            last[i] = max(last.get(i, 0), it)
        for i in list(self.owned):
            if i in counts:
                self.owned[i][0] += counts[i]
                self.owned[i][1] = last[i]
        # the slots in raw-id order: owned ids, then the empty slots, then the last (shared) slot
        existing = [(i, self.score(*self.owned[i])) for i in sorted(self.owned)]
        existing += [(None, Fraction(0))] * (self.slots - 1 - len(self.owned))
        existing += [("miss", Fraction(INT64_MAX))]
        new = sorted((i for i in counts if i not in self.owned), key=lambda i: (-counts[i], i))
        merged = existing + [(i, self.score(counts[i], last[i])) for i in new]
        order = sorted(range(len(merged)), key=lambda k: (-merged[k][1], k))  # stable, descending
        keep = {merged[k][0] for k in order[: self.slots]}
        self.owned = {i: v for i, v in self.owned.items() if i in keep}
        for i in new:
            if i in keep:
                self.owned[i] = [counts[i], last[i]]


def zipf_batch(rng, batch):
    a = rng.zipf(1.2, batch) % 200
    b = rng.integers(0, 50, batch)
    lengths = rng.integers(0, 4, batch)
    bag = rng.zipf(1.3, int(lengths.sum())) % 80
    values = torch.from_numpy(np.concatenate([a, b, bag])).long()
    lens = torch.from_numpy(np.concatenate([np.ones(2 * batch), lengths])).int()
    return KeyedJaggedTensor(keys=["a", "b", "bag"], values=values, lengths=lens), {"a": a, "bag": bag}


def module(policy="lfu", interval=1, reset=True, kind="rowwise_adagrad", rows=ROWS):
    torch.manual_seed(0)
    return MCHEmbedding(TABLES, DIM, rows, policy, interval, 1.0, reset, EmbeddingOptimizer(kind=kind))


def all_ids_kjt():
    ids = [torch.arange(200), torch.arange(200) % 50, torch.arange(200) % 80]
    return KeyedJaggedTensor(keys=["a", "b", "bag"], values=torch.cat(ids), lengths=torch.ones(600, dtype=torch.int32))


def slots_of_every_id(m):
    """{field: (n,) slot of every id} (eval mode: remap only)."""
    was = m.training
    m.eval()
    values = m.rewrite(all_ids_kjt()).values()
    m.train(was)
    return {"a": values[:200], "b": values[200:250], "bag": values[400:480]}


def owned_state(mch):
    """{raw id: (count, last_access)} of a TorchRec MCH module's occupied slots."""
    raw = mch._mch_sorted_raw_ids
    occupied = raw != INT64_MAX
    counts = mch._mch_counts[occupied].tolist()
    last = mch._mch_last_access_iter[occupied].tolist() if hasattr(mch, "_mch_last_access_iter") else [0] * len(counts)
    return {int(i): (c, t) for i, c, t in zip(raw[occupied].tolist(), counts, last)}


@pytest.mark.parametrize("policy,interval", [("lfu", 1), ("lfu", 3), ("distance_lfu", 2)])
def test_slot_owners_match_the_port_and_evicted_ids_map_to_the_shared_slot(policy, interval):
    m = module(policy, interval)
    m.train()
    ports = {name: PortMCH(rows, policy, interval) for name, rows in ROWS.items()}
    rng = np.random.default_rng(0)
    former = {}  # field -> {id: slot} at an earlier step
    evicted_seen = 0
    for step in range(12):
        features, ids = zipf_batch(rng, 48)
        m(features)
        for name, port in ports.items():
            port.train_batch(ids[name])
            got = owned_state(m.mch_modules()[name])
            assert set(got) == set(port.owned), f"{name} step {step}: owners differ"
            assert {i: c for i, (c, _) in got.items()} == {i: v[0] for i, v in port.owned.items()}
            if policy == "distance_lfu":
                assert {i: t for i, (_, t) in got.items()} == {i: v[1] for i, v in port.owned.items()}
        slots = slots_of_every_id(m)
        for name, rows in ROWS.items():
            owned = sorted(ports[name].owned)
            mine = slots[name]
            # owners: distinct slots below the last one; every other id: the last (shared) slot
            assert len(set(mine[owned].tolist())) == len(owned) and all(int(s) < rows - 1 for s in mine[owned])
            others = torch.ones(mine.numel(), dtype=torch.bool)
            others[owned] = False
            assert torch.all(mine[others] == rows - 1)
            for i, slot in former.get(name, {}).items():
                if i not in ports[name].owned:  # evicted since: maps to the shared slot; its slot has a new owner
                    evicted_seen += 1
                    assert int(mine[i]) == rows - 1
                    assert int(slot) in mine[owned].tolist()
            former[name] = {i: int(mine[i]) for i in owned}
        assert torch.equal(slots["b"], torch.arange(50))  # unmanaged field: ids unchanged
    assert evicted_seen > 0, "the sequence must evict owned ids"


def test_lookups_are_the_table_rows_of_the_remapped_ids():
    m = module()
    m.train()
    rng = np.random.default_rng(1)
    for _ in range(4):
        m(zipf_batch(rng, 64)[0])
    m.eval()
    features, _ = zipf_batch(rng, 32)
    with torch.no_grad():
        out = m(features).to_dict()
    remapped = m.rewrite(features)
    for name in ("a", "b"):
        assert torch.equal(out[name], m.fused.weight(name)[remapped[name].values()])
    bag, weight = remapped["bag"], m.fused.weight("bag")
    start = 0
    for b, n in enumerate(bag.lengths().tolist()):
        rows = bag.values()[start:start + n]
        expected = weight[rows].mean(0) if n else torch.zeros(DIM)
        assert torch.allclose(out["bag"][b], expected, atol=1e-6)
        start += n


def test_evicted_slots_get_fresh_rows_and_zero_optimizer_state():
    m = module(kind="rowwise_adagrad")
    m.train()
    rng = np.random.default_rng(2)
    for _ in range(3):
        (m(zipf_batch(rng, 64)[0]).values() ** 2).sum().backward()
    weight = m.fused.weight("a").detach().clone()
    owners = owned_state(m.mch_modules()["a"])
    slots_before = slots_of_every_id(m)["a"]
    features = KeyedJaggedTensor(keys=["a", "b", "bag"],
                                 values=torch.cat([torch.full((40,), 199), torch.zeros(40, dtype=torch.long)]),
                                 lengths=torch.cat([torch.ones(80, dtype=torch.int32), torch.zeros(40, dtype=torch.int32)]))
    assert 199 not in owners
    m(features)  # id 199 seen 40 times: it takes the slot of the least-counted owner
    slots_after = slots_of_every_id(m)["a"]
    new_slot = int(slots_after[199])
    assert new_slot < ROWS["a"] - 1
    loser = [i for i in owners if int(slots_before[i]) == new_slot]
    assert len(loser) == 1 and int(slots_after[loser[0]]) == ROWS["a"] - 1
    assert not torch.equal(m.fused.weight("a")[new_slot], weight[new_slot])
    assert float(m.fused.weight("a")[new_slot].detach().abs().max()) <= 1 / ROWS["a"] ** 0.5
    state = [v for k, s in m.fused_optimizer().state.items() if k.data_ptr() == m.fused.weight("a").data_ptr()
             for v in s.values()][0]
    assert float(state[new_slot]) == 0.0
    kept = torch.ones(ROWS["a"], dtype=torch.bool)
    kept[new_slot] = False
    assert torch.equal(m.fused.weight("a")[kept], weight[kept])  # forward only: other rows untouched


def test_without_reset_an_evicted_slot_keeps_its_row():
    m = module(reset=False, kind="sgd")
    m.train()
    rng = np.random.default_rng(3)
    for _ in range(3):
        m(zipf_batch(rng, 64)[0])
    weight = m.fused.weight("a").detach().clone()
    m(zipf_batch(rng, 256)[0])
    assert torch.equal(m.fused.weight("a"), weight)


def test_eval_only_remaps_and_the_state_round_trips_through_a_checkpoint():
    m = module("distance_lfu", 2)
    m.train()
    rng = np.random.default_rng(4)
    for _ in range(5):
        m(zipf_batch(rng, 64)[0])
    m.eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    features, _ = zipf_batch(rng, 32)
    with torch.no_grad():
        out = m(features).values()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())  # eval left the MCH state alone
    assert int(m.mch_modules()["a"]._current_iter_tensor) == 5
    fresh = module("distance_lfu", 2)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(features).values(), out)
    assert owned_state(fresh.mch_modules()["a"]) == owned_state(m.mch_modules()["a"])
    # training resumes from the checkpointed iteration counter
    fresh.train()
    fresh(zipf_batch(rng, 8)[0])
    assert int(fresh.mch_modules()["a"]._current_iter_tensor) == 6


def test_deployable_form_is_torchrecs_mc_ebc_with_the_same_outputs():
    m = module()
    m.train()
    rng = np.random.default_rng(5)
    for _ in range(3):
        m(zipf_batch(rng, 64)[0])
    m.eval()
    deployable = m.to_inference()
    assert isinstance(deployable.mc_ebc, ManagedCollisionEmbeddingBagCollection)
    features, _ = zipf_batch(rng, 32)
    with torch.no_grad():
        assert torch.equal(deployable(features).values(), m(features).values())
    assert deployable.memory_report().inference_bytes == m.memory_report().inference_bytes
    buffer = io.BytesIO()
    torch.save(deployable, buffer)  # every run keeps the whole deployable model (a pickle)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(features).values(), m(features).values())
    loaded.load_state_dict(deployable.state_dict())  # TorchRec's post-load validation still runs


@pytest.mark.parametrize("policy,entries", [("lfu", 3), ("distance_lfu", 4)])
def test_budget_counts_tables_and_per_slot_state_and_caps_rows(policy, entries):
    tables = [TableSpec("big", 3000), TableSpec("mid", 400), TableSpec("small", 6)]
    method = MCH(eviction_policy=policy, charge_fixed_buffers=False)
    budget = Budget(compression_ratio=0.1)
    plan = method.solve(tables, DIM, budget)
    rows, cap = plan.hparams["rows"], plan.hparams["row_cap"]
    assert set(rows) == {"big", "mid"} and rows == {"big": cap, "mid": cap}  # small: cheaper in full
    expected = (2 * cap + 6) * DIM * 4 + 2 * cap * entries * 8
    assert plan.memory.inference_bytes == expected <= 0.1 * full_embedding_bytes(tables, DIM)
    over = method.memory(tables, DIM, {"rows": {"big": cap + 1, "mid": cap + 1}})
    assert over.inference_bytes > 0.1 * full_embedding_bytes(tables, DIM)  # the cap is the largest that fits
    built = method.build(tables, DIM, plan)
    assert built.memory_report() == plan.memory
    assert plan.memory.training_bytes == expected + 2 * FIXED_BYTES + (2 * cap + 6) * 4  # + row-wise Adagrad state


def test_fixed_buffers_are_charged_by_default_and_measured():
    tables = [TableSpec("big", 3000), TableSpec("mid", 400)]
    method = MCH()
    plan = method.solve(tables, DIM, Budget(compression_ratio=0.2))
    assert plan.memory.breakdown["mch_fixed_buffers"] == len(plan.hparams["rows"]) * FIXED_BYTES == 2 * 8208
    assert method.build(tables, DIM, plan).memory_report() == plan.memory
    with pytest.raises(InfeasibleBudget, match="one slot per compressed field"):
        method.solve(tables, DIM, Budget(compression_ratio=0.01))


@pytest.mark.parametrize("settings,message", [
    ({"eviction_policy": "lru"}, "eviction_policy='lru'; allowed: lfu, distance_lfu"),
    ({"eviction_interval": 0}, "eviction_interval=0; allowed: an integer >= 1"),
    ({"allocation": "greedy"}, "allocation='greedy'; allowed: cap, proportional"),
    ({"decay_exponent": 0}, "decay_exponent=0; allowed: a number > 0"),
    ({"reset_evicted": "yes"}, "reset_evicted='yes'; allowed: true, false"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        MCH(**settings)


def test_collision_rate_counts_the_ids_sharing_the_last_slot():
    from recbench.methods.blocks.collisions import collision_rates

    m = module()
    m.train()
    rng = np.random.default_rng(6)
    for _ in range(4):
        m(zipf_batch(rng, 64)[0])
    owners = {name: len(owned_state(m.mch_modules()[name])) for name in ROWS}
    shared = sum(t.num_embeddings - owners[t.name] for t in TABLES if t.name in ROWS)  # every id without a slot
    total = sum(t.num_embeddings for t in TABLES)
    assert collision_rates(m)["emb/collision_rate"] == pytest.approx(shared / total)
