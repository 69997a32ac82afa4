"""The bit packer: unsigned ``bits``-bit fields stored as a flat little-endian stream of bytes.

Layout: field ``i`` occupies bits ``i*bits .. i*bits+bits-1`` of the stream, and bit ``j`` of the
stream is bit ``j % 8`` of byte ``j // 8`` (a ``uint8`` tensor). For 4 and 2 bits that is two
(four) fields per byte, low bits first; 3-bit fields straddle bytes. ``n`` fields take
``ceil(n * bits / 8)`` bytes, the last byte padded with zeros.

Used by every layer that stores integers below their dtype's width: quantized weights' codes
(``methods._quant``) and a clustered convolution's centroid indices (``methods._clustered_conv``).
Unpacking uses shifts, masks and sums only, so ``torch.export`` traces it into the program, and
few of them, since every op is a node of the exported graph.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_FIELD_BITS", "pack_bits", "unpack_bits", "bit_stream", "bit_fields"]

#: Widest field the packer stores.
MAX_FIELD_BITS = 16


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Store unsigned integers below ``2^bits`` (any shape, flattened) as a ``uint8`` bit stream.

    Raises:
        ValueError: ``bits`` is not in ``1..16``, or a value does not fit in ``bits`` bits.
    """
    if not 1 <= bits <= MAX_FIELD_BITS:
        raise ValueError(f"`1 <= bits <= {MAX_FIELD_BITS}` must hold, but got bits={bits}.")
    flat = values.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"values must lie in 0..{2**bits - 1} for {bits} bits, but got {int(flat.min())}..{int(flat.max())}.")
    stream = ((flat.unsqueeze(1) >> torch.arange(bits, device=flat.device)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, device=flat.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` fields of ``packed``, flat.

    Where fields do not straddle bytes (1, 2, 4 and 8 bits), one shift per field of each byte, in
    ``uint8``; otherwise through :func:`bit_stream` and :func:`bit_fields`, in ``int64``.
    Convert the result to the dtype you need.
    """
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        fields = ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)
        return fields if fields.numel() == numel else fields[:numel]
    return bit_fields(bit_stream(packed, torch.int32), bits, numel)


def bit_stream(packed: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Every bit of ``packed`` as a flat tensor of 0s and 1s of ``dtype``, bit 0 of byte 0 first.

    A buffer that holds several packed streams one after the other (each padded to whole bytes)
    is expanded once here and each stream read with :func:`bit_fields` at its offset.
    """
    return ((packed.to(dtype).unsqueeze(1) >> torch.arange(8, device=packed.device, dtype=dtype)) & 1).reshape(-1)


def bit_fields(stream: torch.Tensor, bits: int, numel: int, start: int = 0) -> torch.Tensor:
    """The ``numel`` ``bits``-bit fields of a :func:`bit_stream` that begin at bit ``start``, flat, ``int64``."""
    fields = stream[start : start + numel * bits].reshape(numel, bits)
    return (fields << torch.arange(bits, device=stream.device, dtype=stream.dtype)).sum(1)
