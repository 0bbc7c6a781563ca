"""Parity of AutoSrh with Hetu's autosrh (Hsword/Hetu, commit a1cb1bcaf236c9f1d452733b105997d50c16c9df).

Independent numpy ports, written here from the reference, of
* the frequency grouping: ``tools/EmbeddingMemoryCompression/models/load_data.py``
  ``get_whole_frequency_grouping`` (the loop over ``nsplit`` groups of the whole feature space);
* the alpha update of the search: ``tools/EmbeddingMemoryCompression/methods/scheduler/autosrh.py``
  ``AutoSrhTrainer.get_eval_nodes`` / ``train_step`` with the lookup of
  ``methods/layers/autosrh.py`` (e * alpha[group]): the gradient of the loss plus ``alpha_l1`` *
  sum |alpha| (the lookup's deduplicated rows summed into a dense (nsplit, D) gradient,
  ``python/hetu/gpu_ops/executor.py`` ``sum_node_list``; |x|' = 0 at 0, ``src/ops/Abs.cu``), divided
  by its mean |g| over the last axis + 1e-8, an SGD step of ``alpha_lr``, then ``param_clip_op``
  to [0, 1] (``python/hetu/gpu_ops/ParamClip.py``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.autosrh import AutoSrhEmbedding, whole_space_groups
from recbench.types import TableSpec

DIM = 4


def hetu_grouping(counter: np.ndarray, nsplit: int) -> np.ndarray:
    """Port of ``get_whole_frequency_grouping``'s loop (without its file cache)."""
    num_embed = len(counter)
    indices = np.argsort(counter)
    nignore, group_index = 0, 0
    grouping = np.zeros(counter.shape, dtype=np.int32)
    cur_nsplit = nsplit
    while cur_nsplit != 0:
        threshold = (num_embed - nignore) / cur_nsplit
        assert int(threshold) > 0
        minvalue = counter[indices[nignore]]
        places = counter == minvalue
        cnt = places.sum()
        if cnt >= threshold:
            nignore += cnt
            grouping[places] = group_index
        else:
            cur_index = nignore + int(threshold) - 1
            target_value = counter[indices[cur_index]]
            offset = 1
            while True:
                if cur_index + offset >= num_embed or counter[indices[cur_index + offset]] != target_value:
                    ending = cur_index + offset
                    break
                elif cur_index - offset <= nignore or counter[indices[cur_index - offset]] != target_value:
                    ending = cur_index - offset + 1
                    break
                offset += 1
            grouping[indices[nignore:ending]] = group_index
            nignore = ending
        cur_nsplit -= 1
        group_index += 1
    if nignore < num_embed:
        grouping[indices[nignore:num_embed]] = group_index - 1
    return grouping


@pytest.mark.parametrize("case", ["zipf", "heavy_minimum", "few_values", "distinct"])
def test_grouping_equals_hetu(case):
    rng = np.random.default_rng(7)
    counts = {"zipf": (2000 / np.arange(1, 3001) ** 1.1).astype(np.int64)[rng.permutation(3000)],
              "heavy_minimum": np.r_[np.zeros(700, np.int64), rng.integers(1, 50, 300)],
              "few_values": rng.integers(0, 9, 500),
              "distinct": rng.permutation(400)}[case]
    for nsplit in (2, 6, 10):
        try:
            expected = hetu_grouping(counts, nsplit)
        except AssertionError:  # Hetu stops when the rows run out before the groups (9 counts, 10 groups)
            assert case == "few_values" and nsplit == 10
            groups = whole_space_groups(counts, nsplit)
            assert len(set(groups.tolist())) < nsplit and all(len(set(counts[groups == g])) >= 1 for g in set(groups))
            continue
        assert np.array_equal(whole_space_groups(counts, nsplit), expected), (case, nsplit)


def test_alpha_update_equals_hetu():
    """One search step on fixed weights, alpha (with entries at 0 and 1) and a batch with a sum-pooled
    multi-hot field: recbench's ``selection_step`` against the numpy port of Hetu's alpha node."""
    rng = np.random.default_rng(3)
    tables = [TableSpec("u", 20, rng.integers(0, 30, 20)), TableSpec("i", 15, rng.integers(0, 30, 15)),
              TableSpec("tags", 10, rng.integers(0, 30, 10), pooling="sum", multi_hot=True)]
    rows = sum(t.num_embeddings for t in tables)
    l1, lr, nsplit = 2e-3, 0.05, 6
    module = AutoSrhEmbedding(tables, DIM, {"kept": [], "nnz": rows * DIM // 2, "schedule": "hetu",
                                            "grouping": "global", "num_groups": nsplit, "selection_init": 1.0,
                                            "selection_l1": l1, "selection_learning_rate": lr,
                                            "retrain_init": "inherit"})
    module.advance()  # warmup -> search
    table = rng.normal(0, 0.5, (rows, DIM))
    batch = 8
    ids = [rng.integers(0, 20, batch), rng.integers(0, 15, batch)]
    tag_lengths = rng.integers(0, 4, batch)
    tags = rng.integers(0, 10, int(tag_lengths.sum()))
    kjt = KeyedJaggedTensor(keys=["u", "i", "tags"], values=torch.from_numpy(np.concatenate(ids + [tags])),
                            lengths=torch.from_numpy(np.concatenate([np.ones(2 * batch, np.int64), tag_lengths])))
    readout = rng.normal(0, 1, 3 * DIM)
    labels = rng.integers(0, 2, batch).astype(np.float64)

    # --- the port (float64) ---
    group = hetu_grouping(np.concatenate([t.counts for t in tables]), nsplit)
    offsets = [0, 20, 35]
    lookups = [(b, 0, offsets[0] + x) for b, x in enumerate(ids[0])] + [(b, 1, offsets[1] + x) for b, x in enumerate(ids[1])]
    lookups += [(b, 2, offsets[2] + x) for b, x in zip(np.repeat(np.arange(batch), tag_lengths), tags)]

    def hetu_step(alpha):
        out = np.zeros((batch, 3 * DIM))
        for b, f, row in lookups:
            out[b, f * DIM:(f + 1) * DIM] += table[row] * alpha[group[row]]
        probability = 1 / (1 + np.exp(-(out @ readout)))
        d_out = np.outer((probability - labels) / batch, readout)
        grad = np.zeros_like(alpha)
        for b, f, row in lookups:  # deduplicated lookup gradient summed into the dense alpha gradient
            grad[group[row]] += d_out[b, f * DIM:(f + 1) * DIM] * table[row]
        grad += l1 * np.sign(alpha)
        normalised = grad / (np.abs(grad).mean(axis=-1, keepdims=True) + 1e-8)
        return alpha - lr * normalised

    alpha0 = rng.uniform(0.05, 0.95, (nsplit, DIM))
    alpha0[0, 1] = alpha0[3, 2] = 0.0
    first = hetu_step(alpha0)  # entries near the bounds that step across them: the clip acts on them
    alpha0[(first > alpha0) & (alpha0 > 0)] = 0.999
    alpha0[(first < alpha0) & (alpha0 < 0.3)] = 0.001
    unclipped = hetu_step(alpha0)
    expected = np.clip(unclipped, 0.0, 1.0)
    assert (unclipped > 1).any() and (unclipped < 0).any()

    with torch.no_grad():
        module.selection.copy_(torch.tensor(alpha0))
        module.weight.copy_(torch.tensor(table))

    def loss():
        logits = module(kjt).values() @ torch.tensor(readout, dtype=torch.float32)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=torch.float32))

    module.selection_step(loss)

    got = module.selection.detach().double().numpy()
    assert np.allclose(got, expected, atol=1e-5), np.abs(got - expected).max()
    assert not np.allclose(got, alpha0)
    assert not module.selection.requires_grad  # stepped outside every optimizer
    assert torch.equal(module.weight.detach(), torch.tensor(table, dtype=torch.float32))  # the table is untouched
