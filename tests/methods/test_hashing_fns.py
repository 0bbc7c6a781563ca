"""The shared hash family: Carter-Wegman ((a x + b) mod p) mod m with p = 2^31 - 1."""
import numpy as np
import pytest
import torch

from recbench.methods.blocks import hashing_fns as H


def test_universal_matches_exact_integer_arithmetic_without_overflow():
    a, b = H.draw(7, (64,))
    ids = torch.tensor([0, 1, 12345, H.PRIME - 1, H.PRIME, 2**40 + 3] * 64)[:64]
    got = H.universal(ids, a, b, 1000)
    expected = [((int(ai) * (int(x) % H.PRIME) + int(bi)) % H.PRIME) % 1000 for ai, bi, x in zip(a, b, ids)]
    assert got.tolist() == expected
    assert int(a.min()) >= 1 and int(a.max()) < H.PRIME and int(b.min()) >= 0 and int(b.max()) < H.PRIME


def test_universal_spreads_ids_evenly_chi_square():
    a, b = H.draw(0, (1,))
    buckets, ids = 97, torch.arange(200_000)
    counts = torch.bincount(H.universal(ids, a, b, buckets), minlength=buckets).double()
    expected = len(ids) / buckets
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 96 degrees of freedom: mean 96, sd ~13.9; 200 is > 7 sd above the mean
    assert chi2 < 200, chi2


def test_pairwise_collision_rate_is_about_one_over_m():
    a, b = H.draw(3, (2000, 1))
    pairs = torch.tensor([[5, 6], [10, 1_000_010], [123, 456]])
    for x, y in pairs.tolist():
        rate = float((H.universal(torch.tensor([x]), a, b, 50) == H.universal(torch.tensor([y]), a, b, 50)).double().mean())
        assert rate < 3 / 50


def test_deterministic_per_seed_and_different_across_seeds_and_positions():
    a0, b0 = H.draw(1, (4,))
    a1, b1 = H.draw(1, (4,))
    a2, _ = H.draw(2, (4,))
    assert torch.equal(a0, a1) and torch.equal(b0, b1) and not torch.equal(a0, a2)
    ids = torch.arange(1000).unsqueeze(1)
    per_field = H.universal(ids, a0, b0, 100)  # (1000, 4): one hash function per column
    assert all(not torch.equal(per_field[:, 0], per_field[:, j]) for j in range(1, 4))


def test_modulo_option_and_dispatch():
    ids = torch.arange(20)
    assert H.hash_ids("modulo", ids, None, None, 7).tolist() == (np.arange(20) % 7).tolist()
    with pytest.raises(ValueError, match="allowed: universal, modulo"):
        H.hash_ids("murmur", ids, None, None, 7)


def test_buckets_broadcast_per_value():
    a, b = H.draw(0, (3,))
    buckets = torch.tensor([2, 5, 11])
    out = H.universal(torch.full((3,), 99), a, b, buckets)
    assert (out < buckets).all() and (out >= 0).all()
