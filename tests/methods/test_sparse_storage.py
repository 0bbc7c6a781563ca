"""Sparse storage of pruned tables: hand-computed byte counts, the inverse, and the compressed tensors."""
from __future__ import annotations

import pytest
import torch

from recbench.methods.blocks import sparse_storage as ss


@pytest.mark.parametrize("max_value,width,dtype", [
    (0, 1, torch.uint8), (255, 1, torch.uint8), (256, 2, torch.uint16), (65535, 2, torch.uint16),
    (65536, 4, torch.uint32), (2 ** 32 - 1, 4, torch.uint32), (2 ** 32, 8, torch.int64)])
def test_index_width_is_the_smallest_unsigned_type(max_value, width, dtype):
    assert ss.index_width(max_value) == width
    assert ss.index_dtype(max_value) == dtype


def test_format_bytes_by_hand():
    # 1000 x 16 table with 2000 kept entries
    assert ss.format_layout("dense", 1000, 16, 2000).bytes == 1000 * 16 * 4  # 64000
    csr = ss.format_layout("csr", 1000, 16, 2000)
    # values 2000*4 + columns 2000*1 (D-1=15 fits uint8) + pointers 1001*2 (nnz=2000 needs uint16)
    assert csr.breakdown == {"values": 8000, "column_indices": 2000, "row_pointers": 2002}
    assert csr.bytes == 12002 and csr.index_bytes == 4002
    coo = ss.format_layout("coo", 1000, 16, 2000)
    # values 8000 + rows 2000*2 (999 needs uint16) + columns 2000*1
    assert coo.breakdown == {"values": 8000, "row_indices": 4000, "column_indices": 2000}
    bitmap = ss.format_layout("bitmap", 1000, 16, 2000)
    # values 8000 + bits 1000 rows * 2 bytes + pointers 1001*2
    assert bitmap.breakdown == {"values": 8000, "bitmap": 2000, "row_pointers": 2002}


def test_cheapest_format_by_hand():
    # 12002 (csr) == 12002 (bitmap) < 14000 (coo) < 64000: tie goes to csr
    assert ss.layout(1000, 16, 2000).format == "csr"
    # nnz=4000: csr 16000+4000+2002=22002, bitmap 16000+2000+2002=20002, coo 16000+8000+4000=28000
    assert (ss.layout(1000, 16, 4000).format, ss.stored_bytes(1000, 16, 4000)) == ("bitmap", 20002)
    # nnz=100: coo 400+200+100=700 < csr 400+100+1001=1501
    assert (ss.layout(1000, 16, 100).format, ss.stored_bytes(1000, 16, 100)) == ("coo", 700)
    # everything kept: dense 64000 < bitmap 64000+2000+2002
    assert (ss.layout(1000, 16, 16000).format, ss.stored_bytes(1000, 16, 16000)) == ("dense", 64000)
    # row pointers widen when nnz passes 255: 10 x 32 table, csr 255 -> 1020+255+11, 256 -> 1024+256+22
    assert ss.format_layout("csr", 10, 32, 255).bytes == 1286
    assert ss.format_layout("csr", 10, 32, 256).bytes == 1302
    # a mask of density d costs more than d of the dense bytes
    assert ss.stored_bytes(1000, 16, 1600) > 0.1 * 64000


def test_stored_bytes_is_monotone_in_nnz():
    previous = -1
    for nnz in range(0, 40 * 24 + 1):
        now = ss.stored_bytes(40, 24, nnz)
        assert now >= previous
        previous = now


def test_max_nnz_within_inverts_the_cheapest_bytes():
    assert ss.max_nnz_within(1000, 16, 12002) == 2000  # nnz=2001 costs 12006 (bitmap) / 12007 (csr)
    assert ss.max_nnz_within(1000, 16, 12005) == 2000
    assert ss.max_nnz_within(1000, 16, 12006) == 2001
    assert ss.max_nnz_within(1000, 16, 64000) == 16000  # dense fits
    assert ss.max_nnz_within(1000, 16, 0) == 0  # an empty COO table costs nothing
    assert ss.max_nnz_within(1000, 16, -1) == -1
    for budget in (1, 77, 5000, 31000, 63999):
        nnz = ss.max_nnz_within(1000, 16, budget)
        assert ss.stored_bytes(1000, 16, nnz) <= budget < ss.stored_bytes(1000, 16, nnz + 1)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="allowed: dense, csr, coo, bitmap"):
        ss.format_layout("ell", 4, 4, 1)
    with pytest.raises(ValueError, match="nnz must be in"):
        ss.layout(4, 4, 17)
    with pytest.raises(ValueError, match="same"):
        ss.compress(torch.zeros(3, 4), torch.zeros(3, 5, dtype=torch.bool))


@pytest.mark.parametrize("fmt", ss.FORMATS)
@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 1.0])
def test_compress_holds_the_closed_form_bytes_and_looks_up_exactly(fmt, density):
    generator = torch.Generator().manual_seed(int(density * 100))
    rows, dim = 300, 13  # odd D: bitmap rows are padded to 2 bytes
    weight = torch.randn(rows, dim, generator=generator)
    mask = torch.rand(rows, dim, generator=generator) < density
    mask[7] = True  # one full row
    mask[8] = False  # one empty row
    weight[mask & (torch.rand(rows, dim, generator=generator) < 0.05)] = 0.0  # kept zeros are still stored
    table = ss.compress(weight, mask, fmt)
    nnz = int(mask.sum())
    assert table.format == fmt and table.nnz == nnz
    assert table.stored_bytes() == ss.format_layout(fmt, rows, dim, nnz).bytes
    ids = torch.tensor([0, 8, 7, 7, 299, 150, 8, 1])
    expected = torch.where(mask, weight, 0.0)[ids]
    assert torch.equal(table.lookup(ids), expected)
    assert torch.equal(table.lookup(torch.arange(rows)), torch.where(mask, weight, 0.0))
    assert table.lookup(torch.zeros(0, dtype=torch.long)).shape == (0, dim)


def test_compress_picks_the_cheapest_and_survives_a_state_dict_round_trip():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 16, generator=generator)
    for nnz in (100, 2000, 4000, 16000):
        mask = torch.zeros(16000, dtype=torch.bool)
        mask[torch.randperm(16000, generator=generator)[:nnz]] = True
        mask = mask.view(1000, 16)
        table = ss.compress(weight, mask)
        assert table.format == ss.layout(1000, 16, nnz).format
        assert table.stored_bytes() == ss.stored_bytes(1000, 16, nnz)
        copy = ss.SparseTable(table.format, 1000, 16, nnz,
                              {k: torch.empty_like(v) for k, v in table.state_dict().items()})
        copy.load_state_dict(table.state_dict())
        assert torch.equal(copy.lookup(torch.arange(1000)), torch.where(mask, weight, 0.0))
