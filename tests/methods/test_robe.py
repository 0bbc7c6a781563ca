"""ROBE-Z: blocks of Z consecutive values at hashed offsets of one circular array, sparse gradients."""
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import hashing_fns as H
from recbench.methods.robe import Robe, RobeEmbedding
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 16
TABLES = [TableSpec("a", 500), TableSpec("b", 300, pooling="mean", multi_hot=True)]


def kjt(a_ids, b_ids):
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.cat([a_ids, b_ids]),
                             lengths=torch.ones(len(a_ids) + len(b_ids), dtype=torch.int32))


def module(size=1000, block_size=4, sign_hash=True, seed=0):
    torch.manual_seed(0)
    return RobeEmbedding(TABLES, DIM, size, block_size, sign_hash, kept=[], hash_seed=seed)


def test_embedding_reads_blocks_at_hashed_offsets_with_signs():
    m = module(block_size=4)
    ids = torch.arange(300)
    out = m(kjt(ids, ids)).to_dict()["a"]
    a, b = H.draw(0, (2, 2, DIM))
    offsets = H.universal(ids.unsqueeze(1), a[0, 0, :4], b[0, 0, :4], 1000)  # 4 blocks of Z = 4
    positions = (offsets.repeat_interleave(4, dim=1) + torch.arange(DIM) % 4) % 1000
    signs = 1 - 2 * H.universal(ids.unsqueeze(1), a[1, 0], b[1, 0], 2)
    assert torch.equal(m.indices(torch.zeros(300, dtype=torch.long), ids), positions)
    assert torch.allclose(out, m.array.detach()[positions, 0] * signs)


def test_blocks_wrap_around_the_end_of_the_array():
    m = module(size=37, block_size=16, sign_hash=False)
    ids = torch.arange(300)
    positions = m.indices(torch.zeros(300, dtype=torch.long), ids)
    wrapped = (positions[:, -1] < positions[:, 0]).nonzero().flatten()
    assert len(wrapped) > 0, "with M = 37 and Z = 16 some blocks must cross the end"
    row = positions[wrapped[0]]
    start = int(row[0])
    assert row.tolist() == [(start + i) % 37 for i in range(DIM)]
    out = m(kjt(ids, ids % 300)).to_dict()["a"]
    assert torch.equal(out[wrapped[0]], m.array.detach()[row, 0])


def test_same_field_and_id_give_the_same_vector_fields_differ():
    m = module().eval()
    ids = torch.tensor([7, 7, 42])
    out = m(kjt(ids, ids)).to_dict()
    assert torch.equal(out["a"][0], out["a"][1]) and not torch.equal(out["a"][0], out["a"][2])
    assert not torch.equal(out["a"][0], out["b"][0])  # per-field salts


def test_memory_is_the_array_and_budget_sets_its_size():
    hp = Robe().solve(TABLES, DIM, Budget(compression_ratio=0.1)).hparams
    full = (500 + 300) * DIM * 4
    assert hp["size"] == int(0.1 * full) // 4
    built = solve_and_build(Robe(), TABLES, DIM, Budget(compression_ratio=0.1))
    report = built.memory_report()
    assert report.inference_bytes == hp["size"] * 4 == built.array.numel() * 4
    assert report.training_bytes == 2 * hp["size"] * 4  # + Adagrad state of the same size
    assert report.parameters == hp["size"]


def test_array_gets_sparse_gradients_and_adagrad_updates_only_touched_values():
    m = module(size=5000)
    optimizers = build_optimizers(m, m, DenseOptimizer(), EmbeddingOptimizer(kind="adagrad", learning_rate=0.1))
    assert set(optimizers) == {"sparse"}
    before = m.array.detach().clone()
    ids = torch.tensor([1, 2, 3])
    m(kjt(ids, ids)).values().sum().backward()
    assert m.array.grad.is_sparse
    optimizers["sparse"].step()
    touched = torch.unique(torch.cat([m.indices(torch.full((3,), f), ids).flatten() for f in (0, 1)]))
    changed = (m.array.detach() != before).flatten().nonzero().flatten()
    assert torch.equal(changed, touched)


def test_kept_fields_stay_full():
    hp = Robe().solve(TABLES, DIM, Budget(compression_ratio=0.5, min_rows_to_compress=400)).hparams
    assert hp["kept"] == ["b"]
    built = solve_and_build(Robe(), TABLES, DIM, Budget(compression_ratio=0.5, min_rows_to_compress=400))
    out = built(kjt(torch.arange(5), torch.tensor([3, 4, 5, 6, 7]))).to_dict()["b"]
    assert torch.equal(out, built.kept_table.detach()[3:8])
    assert built.memory_report().inference_bytes == Robe().memory(TABLES, DIM, hp).inference_bytes
