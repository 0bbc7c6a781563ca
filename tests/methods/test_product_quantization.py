"""dpq / mgqe: code assignment (argmax of dot products / argmin of distances), straight-through
training form equal to the hard deployable form, packed code widths, and MGQE's frequency split."""
import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import bit_packing
from recbench.methods.base import InfeasibleBudget
from recbench.methods.dpq import DPQ
from recbench.methods.mgqe import MGQE
from recbench.methods.families.product_quantization import HeadIndex, ProductQuantizedEmbedding, head_rows
from recbench.types import Budget, TableSpec

DIM = 8


def tables():
    rng = np.random.default_rng(0)
    return [TableSpec("a", 200, rng.integers(0, 1000, 200)), TableSpec("b", 50, rng.integers(0, 1000, 50))]


def module(assignment="softmax", parts=4, codewords=5, tail=5, head=None, codebooks="shared", normalize=False):
    torch.manual_seed(0)
    return ProductQuantizedEmbedding(tables(), DIM, [], parts, codewords, tail, head, assignment, codebooks,
                                     normalize, temperature=1.0, commitment=0.25)


def kjt(a_ids, b_ids):
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.cat([a_ids, b_ids]),
                             lengths=torch.ones(len(a_ids) + len(b_ids), dtype=torch.int32))


def brute_force_codes(m, assignment):
    q = m.query.detach().view(m.num_rows, m.parts, 1, -1)
    keys = m.keys.detach()[0].unsqueeze(0)  # (1, P, K, d)
    if assignment == "softmax":
        return (q * keys).sum(-1).argmax(-1)  # argmax_k <q_j, key_jk>
    return ((q - keys) ** 2).sum(-1).argmin(-1)  # argmin_k ||q_j - key_jk||^2


@pytest.mark.parametrize("assignment", ["softmax", "vq"])
@pytest.mark.parametrize("codebooks", ["shared", "per_field"])
def test_codes_are_the_argmax_as_defined_and_the_deployable_form_matches_exactly(assignment, codebooks):
    m = module(assignment, codebooks=codebooks)
    with torch.no_grad():
        m.query.mul_(20.0)  # spread the queries so that many codewords are used
    codes = m.all_codes()
    if codebooks == "shared":
        assert torch.equal(codes, brute_force_codes(m, assignment))
    assert codes.unique().numel() > 1
    deployable = m.to_inference()
    ids = kjt(torch.arange(200), torch.arange(200) % 50)
    assert torch.equal(deployable.read_codes(torch.arange(250)), codes)
    m.eval()
    with torch.no_grad():
        hard = m(ids).values()
    assert torch.equal(hard, deployable(ids).values())
    values = (m.values if assignment == "softmax" else m.keys).detach()
    book = 0 if codebooks == "shared" else 1
    expected = values[book, torch.arange(4), codes[200 + 7]].reshape(-1)  # row 7 of field b
    assert torch.equal(m(kjt(torch.tensor([0]), torch.tensor([7]))).to_dict()["b"][0], expected)


def test_softmax_training_forward_is_hard_and_backward_is_the_softmax_gradient():
    m = module("softmax")
    ids = kjt(torch.arange(20), torch.arange(20))
    with torch.no_grad():
        hard = m.eval()(ids).values()
    m.train()
    out = m(ids).values()
    assert torch.allclose(out, hard, atol=1e-6)  # forward: the one-hot (hard) code
    out.sum().backward()
    assert m.query.grad.is_sparse and m.query.grad.coalesce().values().abs().sum() > 0  # through the softmax
    assert m.keys.grad.abs().sum() > 0 and m.values.grad.abs().sum() > 0


def test_vq_passes_the_gradient_straight_through_and_adds_the_codebook_losses():
    m = module("vq")
    ids = kjt(torch.tensor([3]), torch.tensor([4]))
    out = m.train()(ids).values()
    extra = m.extra_loss()
    assert extra > 0 and m.extra_loss() == 0  # consumed once per step
    (out * torch.arange(2 * DIM, dtype=torch.float32)).sum().backward()
    grad = m.query.grad.coalesce().to_dense()
    assert torch.allclose(grad[3], torch.arange(DIM, dtype=torch.float32))  # identity: q + sg(c - q)
    assert torch.allclose(grad[200 + 4], torch.arange(DIM, 2 * DIM, dtype=torch.float32))
    assert m.keys.grad is None  # keys learn only from the codebook loss
    extra_again = (m.train()(ids), m.extra_loss())[1]
    extra_again.backward()
    assert m.keys.grad.abs().sum() > 0


def test_codes_are_packed_at_the_smallest_width():
    m = module(codewords=5)  # 3 bits per code
    deployable = m.to_inference()
    assert deployable.codes.numel() == math.ceil(250 * 4 * 3 / 8)
    state = deployable.state_dict()
    assert "query" not in state and "keys" not in state  # the query table is training-only
    assert m.memory_report().inference_bytes == math.ceil(250 * 4 * 3 / 8) + 5 * DIM * 4


def test_mgqe_head_is_the_top_tenth_by_training_frequency():
    counts = np.array([5, 90, 7, 90, 1, 60, 0, 3, 2, 8, 50, 4, 4, 70, 6, 9, 11, 12, 0, 1])
    assert head_rows(counts, 0.1, "f").tolist() == [1, 3]  # ceil(0.1 * 20) = 2, ties by lower id
    assert head_rows(counts, 0.2, "f").tolist() == [1, 3, 5, 13]
    with pytest.raises(ValueError, match="counts"):
        head_rows(None, 0.1, "user")


def test_mgqe_tail_rows_use_only_the_first_codewords():
    t = tables()
    heads = MGQE().heads(t)
    assert [len(heads["a"]), len(heads["b"])] == [20, 5]
    assert all(np.all(t_.counts[heads[t_.name]].min() >= np.delete(t_.counts, heads[t_.name]).max()) for t_ in t)
    m = module("vq", parts=2, codewords=8, tail=2, head=heads)
    with torch.no_grad():  # make the last codeword the exact match of every query part
        m.keys[0, :, 7] = 0.0
        m.query.zero_()
    codes = m.all_codes()
    head = m.is_head
    assert torch.all(codes[head] == 7)
    assert torch.all(codes[~head] < 2)
    deployable = m.to_inference()
    assert torch.equal(deployable.read_codes(torch.arange(250)), codes)
    assert deployable.codes.numel() == math.ceil(25 * 2 * 3 / 8)  # head: 3-bit codes
    assert deployable.tail_codes.numel() == math.ceil(225 * 2 * 1 / 8)  # tail: 1-bit codes
    ids = kjt(torch.arange(200), torch.arange(200) % 50)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(ids).values(), deployable(ids).values())
    bitmap_and_ranks = math.ceil(250 / 8) + math.ceil(250 / 64) * 4
    assert m.memory_report().inference_bytes == (math.ceil(25 * 2 * 3 / 8) + math.ceil(225 * 2 / 8)
                                                 + bitmap_and_ranks + 8 * DIM * 4)


def test_head_index_slots_match_a_brute_force_rank():
    g = torch.Generator().manual_seed(3)
    is_head = torch.rand(1000, generator=g) < 0.1
    index = HeadIndex(is_head)
    rows = torch.randperm(1000, generator=g)
    flag, slot = index.slots(rows)
    head_before = torch.cumsum(is_head.long(), 0) - is_head.long()
    assert torch.equal(flag, is_head[rows])
    assert torch.equal(slot, torch.where(is_head[rows], head_before[rows], rows - head_before[rows]))


def test_budget_solves_parts_and_codewords_or_reports_the_range():
    t = [TableSpec("a", 20000, np.ones(20000, dtype=np.int64)), TableSpec("b", 3000, np.ones(3000, dtype=np.int64))]
    for method in (DPQ(), MGQE()):
        for ratio in (0.1, 0.05):
            hp = method.solve(t, 16, Budget(compression_ratio=ratio)).hparams
            achieved = method.memory(t, 16, hp).compression_ratio
            assert 0.9 * ratio <= achieved <= ratio and 16 % hp["parts"] == 0
        with pytest.raises(InfeasibleBudget) as info:
            method.solve(t, 16, Budget(compression_ratio=0.0005))
        assert info.value.min_ratio > 0.0005
        # a gap (code widths are whole bits): the pair with the most code bits under the budget,
        # below (1 - tolerance) x 0.01 (the job flags the run under_budget)
        hp = method.solve(t, 16, Budget(compression_ratio=0.01)).hparams
        assert 0.0084 <= method.memory(t, 16, hp).compression_ratio < 0.0086
    fixed = MGQE(codewords=256, tail_codewords=64)
    hp = fixed.solve(t, 16, Budget(compression_ratio=0.04)).hparams  # only P is solved: P = 2 gives ratio 0.038
    assert (hp["parts"], hp["codewords"], hp["tail_codewords"]) == (2, 256, 64)


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 128, 1000])
def test_head_index_slots_at_block_and_word_edges(rows):
    g = torch.Generator().manual_seed(rows)
    for is_head in (torch.rand(rows, generator=g) < 0.5, torch.ones(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)):
        index = HeadIndex(is_head)
        every = torch.arange(rows)
        flag, slot = index.slots(every)
        head_before = torch.cumsum(is_head.long(), 0) - is_head.long()
        assert torch.equal(flag, is_head)
        assert torch.equal(slot, torch.where(is_head, head_before, every - head_before))


@pytest.mark.parametrize("assignment", ["vq", "softmax"])
def test_training_codes_equal_the_logits_as_defined(assignment):
    """Codes of a training step: argmax of the masked, batch-normalised logits written out of place
    (2 <q, k> - |q|^2 - |k|^2 for vq); the running statistics move the same way."""
    heads = MGQE().heads(tables())
    m = module(assignment, parts=2, codewords=8, tail=2, head=heads, normalize=True)
    with torch.no_grad():
        m.query.mul_(20.0)
    rows = torch.arange(0, 250, 3)
    queries = m.query.detach()[rows].view(len(rows), 2, -1)
    keys = m.keys.detach()[0]
    logits = torch.einsum("upd,pkd->upk", queries, keys)
    if assignment == "vq":
        logits = 2 * logits - (queries * queries).sum(-1, keepdim=True) - (keys * keys).sum(-1).unsqueeze(0)
    mean, var = m.norm.running_mean.clone(), m.norm.running_var.clone()
    normed = torch.nn.functional.batch_norm(logits.reshape(-1, 8), mean, var, training=True, momentum=m.norm.momentum,
                                            eps=m.norm.eps).view_as(logits)
    banned = (~m.is_head[rows]).view(-1, 1, 1) & (torch.arange(8) >= 2)
    expected = normed.masked_fill(banned, float("-inf")).argmax(-1)
    m.train()
    fields = (rows >= 200).long()
    out = m.encode(fields, rows - 200 * fields)
    book_values = (m.values if assignment == "softmax" else m.keys).detach()[0]
    hard = book_values[torch.arange(2), expected].reshape(len(rows), -1)
    assert torch.allclose(out.detach(), hard, atol=1e-5)  # vq: q + (c - q); codewords lie far apart
    assert torch.equal(m.norm.running_mean, mean) and torch.equal(m.norm.running_var, var)
