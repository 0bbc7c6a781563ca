"""dsl against its reference, the authors' code shuyao-wang/DSL (``NeuMF/utils/core.py``,
``NeuMF/main.py``, ``NeuMF/config.py`` at commit 62a00ea4c19e367a740fbd40357afe20c8680457): the
cosine-annealed prune fraction (``CosineDecay``: torch's CosineAnnealingLR, death_rate 0.5,
eta_min 0.005, T_max = the whole training), the update interval 100, and ``truncate_weights``'
per-tensor magnitude death / gradient growth."""
import math
import types

import pytest
import torch

from recbench.methods.dsl import DSL, PruneRegrowHook, prune_fraction
from recbench.types import Budget, Stage, TableSpec
from solve_build import solve_and_build

DIM = 4
TABLES = [TableSpec("a", 40), TableSpec("b", 25), TableSpec("c", 12)]


def reference_fractions(death_rate, total_steps, eta_min, steps):
    """The reference's ``CosineDecay``: a CosineAnnealingLR on a dummy SGD, stepped once per
    optimizer step; ``get_dr`` after t steps."""
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=death_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, total_steps, eta_min)
    out, t = {}, 0
    for target in sorted(steps):
        while t < target:
            sgd.step()
            scheduler.step()
            t += 1
        out[target] = sgd.param_groups[0]["lr"]
    return out


def test_prune_fraction_is_the_references_cosine_decay():
    total = 6260  # MovieLens-100K: 313 steps per epoch x 20 epochs
    steps = [0, 100, 1000, 3130, 5000, 6200]
    expected = reference_fractions(0.5, total, 0.005, steps)
    for t in steps:
        assert prune_fraction(t, total, 0.5, 0.005) == pytest.approx(expected[t], rel=1e-9, abs=1e-12)
    m = DSL()
    assert (m.initial_prune_fraction, m.min_prune_fraction, m.update_interval) == (0.5, 0.005, 100)
    assert m.anneal_epochs is None and m.scope == "field" and m.regrow_fill == "random"


def test_annealing_spans_the_whole_training():
    """T_end = len(train_loader) * num_epochs: the trainer's max_epochs (or its max_steps)."""
    def context(max_epochs, max_steps=None, stage=Stage("train")):
        config = types.SimpleNamespace(batch_size=256, max_epochs=max_epochs, max_steps=max_steps)
        trainer = types.SimpleNamespace(config=config, split=lambda name: range(80_000))
        return types.SimpleNamespace(trainer=trainer, stage=stage)

    assert PruneRegrowHook(DSL()).anneal_steps(context(20)) == 313 * 20
    assert PruneRegrowHook(DSL()).anneal_steps(context(20, max_steps=500)) == 500
    assert PruneRegrowHook(DSL(anneal_epochs=3.0)).anneal_steps(context(20)) == 939  # the earlier variant


def reference_truncate(mask, weight, grad, ranges, death_rate):
    """Independent port of the reference's ``Masking.truncate_weights`` with death='magnitude',
    growth='gradient', redistribution='none', applied to each field's rows as to one tensor:
    num_remove = ceil(death_rate * nonzeros); the k = zeros + num_remove smallest |w| (the zeros
    first) leave the mask; the num_remove entries with the largest |grad * (new_mask == 0)| join."""
    mask, weight = mask.clone(), weight.clone()
    for start, end in ranges:
        m, w, g = mask[start:end], weight[start:end], grad[start:end]
        nonzeros = int(m.sum())
        num_remove = math.ceil(death_rate * nonzeros)
        x, _ = torch.sort(w.abs().flatten())
        threshold = x[m.numel() - nonzeros + num_remove - 1]
        new_mask = w.abs() > threshold
        removed = nonzeros - int(new_mask.sum())
        _, idx = torch.sort((g * (~new_mask).float()).abs().flatten(), descending=True)
        new_mask.view(-1)[idx[:removed]] = True
        mask[start:end] = new_mask
    return mask


def test_prune_and_regrow_matches_the_reference_per_field():
    """Distinct magnitudes and a gradient on every row (more candidates than k), so the reference's
    choice is unique; fails on the earlier global floor(p nnz) ranking."""
    torch.manual_seed(0)
    module = solve_and_build(DSL(), TABLES, DIM, Budget(compression_ratio=0.5))
    with torch.no_grad():
        module.weight.copy_((torch.randperm(module.weight.numel()).float() + 1.0).view_as(module.weight) / 1000)
        module.weight.mul_(module.mask)
    rows = torch.arange(module.num_rows)
    grad = (torch.randperm(module.weight.numel()).float() + 1.0).view_as(module.weight)
    module._gradient = (rows, grad)
    ranges = module.field_ranges()
    assert ranges == [(0, 40), (40, 65), (65, 77)]
    expected = reference_truncate(module.mask, module.weight.detach(), grad, ranges, 0.3)
    before = [int(module.mask[a:b].sum()) for a, b in ranges]
    moved = module.prune_and_regrow(0.3)
    assert torch.equal(module.mask, expected)
    assert moved == sum(math.ceil(0.3 * n) for n in before)
    assert [int(module.mask[a:b].sum()) for a, b in ranges] == before  # each field keeps its count
    assert int(((module.weight != 0) & ~module.mask).sum()) == 0


def test_regrowth_beyond_the_gradient_candidates_is_filled_at_random():
    """One batch row has a gradient: its inactive entries are grown first, the rest of the field's
    ceil(p nnz_f) come from its zero-gradient inactive entries (the reference's arbitrary order)."""
    torch.manual_seed(0)
    module = solve_and_build(DSL(), TABLES, DIM, Budget(compression_ratio=0.5))
    grad = torch.zeros(1, DIM) + 1.0
    module._gradient = (torch.tensor([5]), grad)
    inactive_row5 = ~module.mask[5].clone()
    before_mask = module.mask.clone()
    counts = [int(module.mask[a:b].sum()) for a, b in module.field_ranges()]
    moved = module.prune_and_regrow(0.25)
    assert moved == sum(math.ceil(0.25 * n) for n in counts)
    assert [int(module.mask[a:b].sum()) for a, b in module.field_ranges()] == counts
    assert bool(module.mask[5][inactive_row5].all())  # every gradient candidate regrew
    grown = module.mask & ~before_mask
    assert int(grown[:40].sum()) > int(inactive_row5.sum())  # the fill
    # reproducible: the fill is keyed by mask_seed and the update count
    torch.manual_seed(0)
    again = solve_and_build(DSL(), TABLES, DIM, Budget(compression_ratio=0.5))
    again._gradient = (torch.tensor([5]), grad)
    again.prune_and_regrow(0.25)
    assert torch.equal(again.mask, module.mask)
    # the earlier variant moves only as many entries as there are candidates
    torch.manual_seed(0)
    shrink = solve_and_build(DSL(), TABLES, DIM, Budget(compression_ratio=0.5))
    shrink._gradient = (torch.tensor([5]), grad)
    assert shrink.prune_and_regrow(0.25, scope="global", regrow_fill="shrink") == int(inactive_row5.sum())


def test_bad_dsl_settings_name_key_and_allowed_values():
    with pytest.raises(ValueError, match="scope.*field, global"):
        DSL(scope="row")
    with pytest.raises(ValueError, match="regrow_fill.*random, shrink"):
        DSL(regrow_fill="zero")
    with pytest.raises(ValueError, match="min_prune_fraction"):
        DSL(min_prune_fraction=0.6)
    with pytest.raises(ValueError, match="anneal_epochs"):
        DSL(anneal_epochs=0)
