"""DHE: deterministic dense hash encodings in the stated distribution, decoder width from the budget."""
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.blocks import hashing_fns as H
from recbench.methods.base import InfeasibleBudget
from recbench.methods.dhe import Dhe
from recbench.types import Budget, TableSpec
from solve_build import solve_and_build

DIM = 16
TABLES = [TableSpec("a", 20000), TableSpec("b", 5000, pooling="mean", multi_hot=True)]


def build(ratio=0.05, **kwargs):
    torch.manual_seed(0)
    return solve_and_build(Dhe(**kwargs), TABLES, DIM, Budget(compression_ratio=ratio))


def kjt(a_ids, b_ids):
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.cat([a_ids, b_ids]),
                             lengths=torch.ones(len(a_ids) + len(b_ids), dtype=torch.int32))


def test_uniform_encodings_are_the_scaled_hashes_and_deterministic():
    m = build(num_hashes=64, hash_family="universal")
    ids, fields = torch.arange(3000), torch.zeros(3000, dtype=torch.long)
    enc = m.encodings(fields, ids)
    a, b = H.draw(0, (2, 64))
    expected = H.universal(ids.unsqueeze(1), a[0], b[0], 1_000_000).double() * 2 / 999_999 - 1
    assert torch.allclose(enc.double(), expected, atol=1e-6)
    assert torch.equal(enc, build(num_hashes=64, hash_family="universal").encodings(fields, ids))  # seeded
    assert float(enc.min()) >= -1 and float(enc.max()) <= 1
    assert abs(float(enc.mean())) < 0.02 and abs(float(enc.var()) - 1 / 3) < 0.02  # U(-1, 1)
    other_field = m.encodings(torch.ones(3000, dtype=torch.long), ids)
    assert float((other_field - enc).abs().mean()) > 0.3  # per-field salts


@pytest.mark.parametrize("family", ["hetu", "universal"])
def test_encodings_are_uniform_or_standard_normal(family):
    # seed 1: with hetu's a_j uniform in [1, m), seed 0 draws one slope so small that 3000 consecutive
    # ids barely move that column (a property of the family on small id ranges)
    ids, fields = torch.arange(3000), torch.zeros(3000, dtype=torch.long)
    enc = build(num_hashes=64, distribution="gaussian", hash_family=family, hash_seed=1).encodings(fields, ids)
    assert abs(float(enc.mean())) < 0.02 and abs(float(enc.std()) - 1) < 0.02
    assert abs(float((enc ** 4).mean()) - 3) < 0.15  # Gaussian kurtosis
    enc = build(num_hashes=64, hash_family=family, hash_seed=1).encodings(fields, ids)
    assert float(enc.min()) >= -1 and float(enc.max()) <= 1
    assert abs(float(enc.mean())) < 0.02 and abs(float(enc.var()) - 1 / 3) < 0.02  # U(-1, 1)


def decoder_floats(width, hidden_layers):
    """One decoder with BatchNorm folded: k h + h, (L - 1) (h^2 + h), h D + D."""
    return 1024 * width + width + (hidden_layers - 1) * (width * width + width) + width * DIM + DIM


@pytest.mark.parametrize("layout,hidden_layers,decoders", [("per_field", 5, 2), ("shared", 2, 1)])
def test_width_is_the_largest_within_the_budget(layout, hidden_layers, decoders):
    method, budget = Dhe(layout=layout, hidden_layers=hidden_layers), Budget(compression_ratio=0.05)
    hp = method.solve(TABLES, DIM, budget).hparams
    target = budget_lib.target_bytes(TABLES, DIM, budget)
    width = hp["width"]
    assert hp["kept"] == [] and hp["layout"] == layout
    assert method.memory(TABLES, DIM, hp).inference_bytes == 4 * decoders * decoder_floats(width, hidden_layers)
    assert method.memory(TABLES, DIM, hp).inference_bytes <= target
    assert method.memory(TABLES, DIM, dict(hp, width=width + 1)).inference_bytes > target
    built = solve_and_build(method, TABLES, DIM, budget)
    assert len(built.decoders) == decoders
    assert all(d[0].weight.shape == (width, 1024) for d in built.decoders)


def test_per_field_keeps_a_table_not_larger_than_a_decoder():
    """Hetu's per-field min(plain, DHE): at width h a field whose table is not larger stays plain."""
    tables = [TableSpec("a", 20000), TableSpec("small", 300), TableSpec("b", 5000)]
    method, budget = Dhe(), Budget(compression_ratio=0.1, min_rows_to_compress=0)
    hp = method.solve(tables, DIM, budget).hparams
    one = 4 * decoder_floats(hp["width"], 5)
    assert 300 * DIM * 4 <= one < 5000 * DIM * 4 and hp["kept"] == ["small"]
    assert method.memory(tables, DIM, hp).inference_bytes == 2 * one + 300 * DIM * 4


def test_infeasible_budget_reports_the_reachable_range():
    with pytest.raises(InfeasibleBudget, match="even width 1") as info:
        Dhe().solve(TABLES, DIM, Budget(compression_ratio=0.001))
    assert info.value.min_ratio == pytest.approx(4 * 2 * decoder_floats(1, 5) / ((20000 + 5000) * DIM * 4))


def test_decoding_unique_ids_is_exact_and_batchnorm_folds():
    m = build()
    ids = torch.randint(0, 50, (400,))
    for _ in range(3):  # move the BatchNorm running statistics away from their init
        m(kjt(ids, ids % 7))
    m.eval()
    fields = torch.zeros(400, dtype=torch.long)
    with torch.no_grad():
        naive = m.decoders[0](m.encodings(fields, ids))
        assert torch.allclose(m.encode(fields, ids), naive, atol=1e-6)
        deployable = m.to_inference()
        assert not any(isinstance(x, torch.nn.BatchNorm1d) for d in deployable.decoders for x in d)
        assert torch.allclose(m(kjt(ids, ids % 7)).values(), deployable(kjt(ids, ids % 7)).values(), atol=1e-5)


def test_memory_counts_adam_state_and_batchnorm_statistics():
    m = build()
    report, width = m.memory_report(), m.decoders[0][0].out_features
    params = 1024 * width + 2 * width + 4 * (width * width + 2 * width) + width * DIM + DIM
    assert report.parameters == 2 * params
    assert report.training_bytes == 2 * (3 * 4 * params + 5 * (2 * width * 4 + 8))


def test_config_validation():
    with pytest.raises(ValueError, match="distribution"):
        Dhe(distribution="laplace")
    with pytest.raises(ValueError, match="even num_hashes"):
        Dhe(distribution="gaussian", num_hashes=5)
    with pytest.raises(ValueError, match="layout='global'.*per_field, shared"):
        Dhe(layout="global")
    with pytest.raises(ValueError, match="hash_family='md5'.*hetu, universal"):
        Dhe(hash_family="md5")
    with pytest.raises(ValueError, match="init='xavier'.*hetu, torch"):
        Dhe(init="xavier")


def test_decoding_unique_ids_with_count_weighted_batch_norm_equals_decoding_every_occurrence():
    """Values, gradients and running statistics match BatchNorm over all N repeated rows."""
    from recbench.methods.dhe import decode, decoder

    torch.manual_seed(0)
    unique = torch.randn(50, 32, dtype=torch.float64)
    counts = torch.randint(1, 6, (50,))
    inverse = torch.repeat_interleave(torch.arange(50), counts)
    nets = [decoder(32, 24, 2, 8, "mish", True).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    probe = torch.randn(int(counts.sum()), 8, dtype=torch.float64)
    outs = []
    forwards = (lambda net, x: net(x[inverse]), lambda net, x: decode(net, x, counts)[inverse])
    for net, forward in zip(nets, forwards):
        y = forward(net, unique.clone().requires_grad_(True))
        (y * probe).sum().backward()
        outs.append((y, [p.grad for p in net.parameters()], net[1].running_mean, net[1].running_var))
    (y0, g0, m0, v0), (y1, g1, m1, v1) = outs
    assert torch.allclose(y0, y1, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(g0, g1))
    assert torch.allclose(m0, m1, atol=1e-12) and torch.allclose(v0, v1, atol=1e-12)
    nets[0].eval(), nets[1].eval()
    assert torch.allclose(nets[0](unique), decode(nets[1], unique, counts), atol=1e-12)


def int64_reference_encodings(module, fields, ids):
    """The encodings as defined: int64 hash arithmetic on every (id, hash) at once, one float64 transform."""
    from recbench.methods.dhe import encode_hashes

    x = ids.unsqueeze(1)
    if module.hash_family == "hetu":
        hashes = torch.remainder(torch.remainder(module.a[fields] * x + module.b[fields], module.p[fields]),
                                 module.hash_buckets)
    else:
        hashes = H.universal(x, module.a[fields], module.b[fields], module.hash_buckets)
    return encode_hashes(hashes, module.hash_buckets, module.distribution)


def test_float64_hetu_hash_equals_the_int64_arithmetic_exactly_at_the_edges():
    """floor division in float64 is exact below 2^53: a x + b on a multiple of p or next to one,
    (a x + b) mod p on a multiple of m, and a x + b + p just below 2^53."""
    from recbench.methods.dhe import FLOAT64_INTEGERS, hetu_hashes_float64

    m, p = 1_000_000, 2_147_483_629  # p: a prime below 2^31
    for a in (999_999, 1, 524_287, 3 * 7 * 11 * 13 * 17 * 19, 1 << 19):
        for b in (1, m - 1, 12_345):
            top = (FLOAT64_INTEGERS - 1 - p - b) // a  # the largest x with a x + b + p < 2^53
            xs = {0, 1, 2, 999_999, top, top - 1, top // 2}
            for n in (1, 2, 1000, (a * top + b) // p):  # a x + b on, below and above multiples n p
                xs |= {(n * p - b) // a + d for d in (-1, 0, 1)}
            for n in (1, 7, 2000):  # (a x + b) mod p = n m when x = (n m - b) / a is an integer
                if (n * m - b) % a == 0:
                    xs.add((n * m - b) // a)
            xs = sorted(x for x in xs if 0 <= x <= top)
            expected = [((a * x + b) % p) % m for x in xs]  # Python integers: no overflow
            ours = hetu_hashes_float64(torch.tensor(xs, dtype=torch.float64).unsqueeze(1),
                                       *(torch.tensor([float(v)], dtype=torch.float64) for v in (a, b, p)), m)
            assert [int(h) for h in ours.flatten().tolist()] == expected
    for v in (3 * p, 7 * m, 3 * p + 7 * m, p - 1):  # exact multiples land on 0
        ours = hetu_hashes_float64(torch.tensor([[float(v)]], dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                                   torch.zeros(1, dtype=torch.float64), torch.tensor([float(p)], dtype=torch.float64), m)
        assert int(ours) == (v % p) % m


@pytest.mark.parametrize("family", ["hetu", "universal"])
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_chunked_encodings_equal_the_int64_reference_exactly(family, distribution, monkeypatch):
    """Field runs, chunks (a chunk of 3 rows here) and the float64 hash path change no bit."""
    import recbench.methods.dhe as dhe

    m = build(num_hashes=64, hash_family=family, distribution=distribution, hash_seed=2)
    assert m.hetu_in_float64 == (family == "hetu")
    g = torch.Generator().manual_seed(0)
    fields = torch.randint(0, 2, (500,), generator=g)
    ids = torch.where(fields == 0, torch.randint(0, 20000, (500,), generator=g), torch.randint(0, 5000, (500,), generator=g))
    ids[:4] = torch.tensor([0, 19999, 4999, 0])
    fields[:4] = torch.tensor([0, 0, 1, 1])
    expected = int64_reference_encodings(m, fields, ids)
    assert torch.equal(m.encodings(fields, ids), expected)  # unsorted fields: many short runs
    order = torch.argsort(fields, stable=True)
    monkeypatch.setattr(dhe, "ENCODING_CHUNK", 3 * 64)
    assert torch.equal(m.encodings(fields[order], ids[order]), expected[order])


def test_hetu_hashes_stay_in_int64_where_float64_would_not_be_exact():
    from recbench.methods.dhe import DheEmbedding, float64_is_exact

    assert float64_is_exact(1_000_000, 9_000_000) and not float64_is_exact(1 << 30, 10_000_000)
    tables = [TableSpec("big", 10_000_000), TableSpec("small", 100)]
    m = DheEmbedding(tables, DIM, 2, 1, 16, 1 << 30, "uniform", "mish", True, ["small"], 0)
    assert not m.hetu_in_float64
    ids = torch.tensor([0, 1, 9_999_999, 8_000_000, 123_456_789 % 10_000_000])
    fields = torch.zeros_like(ids)
    assert torch.equal(m.encodings(fields, ids), int64_reference_encodings(m, fields, ids))
