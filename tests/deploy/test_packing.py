"""The bit packer: its byte layout, round trips at every width, and what it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from deploy import bit_fields, bit_stream, pack_bits, unpack_bits


def test_layout_is_a_little_endian_bit_stream() -> None:
    # 3-bit fields 5 (101), 3 (011), 6 (110): stream bits 1,0,1, 1,1,0, 0,1,1 (low bit first) ->
    # byte 0 = bits 0..7 = 1+4+8+16 = 29 + 128 (bit 7 = field 2's bit 1) = 157, byte 1 = bit 8 = 1.
    assert pack_bits(torch.tensor([5, 3, 6]), 3).tolist() == [157, 1]
    # 4-bit fields: two per byte, the first in the low nibble.
    assert pack_bits(torch.tensor([0x3, 0xA, 0xF]), 4).tolist() == [0xA3, 0x0F]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16])
def test_round_trip(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    for numel in (1, 7, 64, 101):
        values = torch.randint(0, 2**bits, (numel,), generator=generator)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, numel).to(torch.int64), values)


def test_streams_one_after_the_other_are_read_at_their_offsets() -> None:
    first, second = torch.tensor([1, 2, 3]), torch.tensor([6, 0, 5, 7])
    packed = torch.cat([pack_bits(first, 2), pack_bits(second, 3)])  # 1 byte, then 2
    stream = bit_stream(packed, torch.int64)
    assert bit_fields(stream, 2, 3).tolist() == first.tolist()
    assert bit_fields(stream, 3, 4, start=8).tolist() == second.tolist()


def test_packing_refuses_values_that_do_not_fit_and_widths_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"values must lie in 0..3 for 2 bits, but got 0..4"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match=r"values must lie in 0..3 for 2 bits, but got -1..1"):
        pack_bits(torch.tensor([-1, 1]), 2)
    for bits in (0, 17):
        with pytest.raises(ValueError, match=rf"`1 <= bits <= 16` must hold, but got bits={bits}"):
            pack_bits(torch.tensor([0]), bits)
