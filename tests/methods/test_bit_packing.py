"""Bit packing of quantized rows and codes: exact round trips at every width, row writes."""
import pytest
import torch

from recbench.methods.blocks import bit_packing as B


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_pack_then_read_round_trips_at_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (1001,), generator=g)
    stream = B.pack_bits(values, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == -(-1001 * bits // 8)  # no per-value padding
    positions = torch.randperm(1001, generator=g)
    assert torch.equal(B.read_bits(stream, bits, positions), values[positions])
    assert torch.equal(B.read_bits(stream, bits, positions.view(7, 143)), values[positions].view(7, 143))


def test_values_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        B.pack_bits(torch.tensor([3, 16]), 4)
    with pytest.raises(ValueError, match="bits"):
        B.pack_bits(torch.tensor([0]), 17)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_write_rows_replaces_only_those_rows(bits):
    dim, rows = 16, 50
    values = torch.randint(0, 1 << bits, (rows, dim), generator=torch.Generator().manual_seed(0))
    stream = B.pack_bits(values.reshape(-1), bits)
    assert stream.numel() == rows * B.row_bytes(dim, bits)  # INT4: two values per byte, INT2: four
    new = torch.randint(0, 1 << bits, (3, dim), generator=torch.Generator().manual_seed(1))
    touched = torch.tensor([4, 17, 49])
    B.write_rows(stream, bits, dim, touched, new)
    expected = values.clone()
    expected[touched] = new
    assert torch.equal(B.read_rows(stream, bits, dim, torch.arange(rows)), expected)


def test_code_width_is_the_smallest_that_fits():
    assert [B.bits_for(k) for k in (1, 2, 3, 4, 5, 256, 257, 65536)] == [1, 1, 2, 2, 3, 8, 9, 16]
    with pytest.raises(ValueError, match="byte-aligned"):
        B.row_bytes(3, 2)
