"""Bit packing: round trips for every width and odd lengths, the pinned bit order, exact sizes, vmap, and int32
work up to 24 bits giving the bytes int64 gives."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from fedsim import bitpack


@pytest.mark.parametrize("width", [*range(1, 17), 23, 24, 25, 31, 32, 56])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 13, 64])
def test_pack_then_unpack_gives_the_values_back_in_packed_size_bytes(width, n):
    g = torch.Generator().manual_seed(width * 100 + n)
    values = torch.randint(0, 2**min(width, 62), (n,), generator=g)
    if n:
        values[0] = 2**width - 1  # the widest value fits
    packed = bitpack.pack(values, width)
    assert packed.dtype == torch.uint8 and packed.shape == (bitpack.packed_size(n, width),)
    unpacked = bitpack.unpack(packed, width, n)
    assert unpacked.dtype == bitpack.int_dtype(width) and torch.equal(unpacked, values)


def test_bits_go_least_significant_first_and_the_last_byte_is_zero_padded():
    assert bitpack.pack(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]
    assert bitpack.pack(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]  # 01 10 11 from bit 0 up
    assert bitpack.pack(torch.tensor([0x1FF, 0]), 9).tolist() == [0xFF, 0x01, 0x00]
    assert bitpack.packed_size(13, 3) == 5 and bitpack.packed_size(0, 7) == 0


def test_vmapped_pack_and_unpack_equal_a_loop():
    values = torch.randint(0, 32, (4, 11), generator=torch.Generator().manual_seed(0))
    packed = vmap(lambda v: bitpack.pack(v, 5))(values)
    assert torch.equal(packed, torch.stack([bitpack.pack(v, 5) for v in values]))
    assert torch.equal(vmap(lambda p: bitpack.unpack(p, 5, 11))(packed), values)


@pytest.mark.parametrize("width", [0, 57])
def test_a_width_outside_1_to_56_is_refused(width):
    with pytest.raises(ValueError, match="bit width must be in 1..56"):
        bitpack.pack(torch.zeros(3, dtype=torch.int64), width)


@pytest.mark.parametrize(("width", "dtype"),
                         [(1, torch.int32), (24, torch.int32), (25, torch.int64), (56, torch.int64)])
def test_widths_up_to_24_bits_work_in_int32_and_wider_ones_in_int64(width, dtype):
    assert bitpack.int_dtype(width) == dtype


@pytest.mark.parametrize("width", [1, 9, 24])
def test_the_bytes_do_not_depend_on_the_integer_dtype_of_the_values(width):
    values = torch.randint(0, 2**width, (29,), generator=torch.Generator().manual_seed(width))
    values[-1] = 2**width - 1
    packed = bitpack.pack(values, width)
    dtypes = [torch.int32, *([torch.int16] if width < 16 else []), *([torch.bool] if width == 1 else [])]
    assert all(torch.equal(bitpack.pack(values.to(dtype), width), packed) for dtype in dtypes)
