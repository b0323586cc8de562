"""The tensor codec: every element type round-trips, bfloat16 decodes exactly, malformed sizes are refused
before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rebalancer_wire.codec import TensorDecodeError, decode, encode, encode_ids, narrowest_ids
from rebalancer_wire.v1 import rebalancer_pb2 as pb


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int16, np.int32, np.int64])
def test_every_element_type_round_trips(dtype):
    array = (np.arange(24) * 3 - 7).astype(dtype).reshape(2, 3, 4)
    decoded = decode(encode(array))
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)


def test_bfloat16_bits_decode_to_the_same_values_in_float32():
    values = torch.tensor([[0.0, 1.0, -2.5, 3.0e38], [1.0e-38, 7.0, 65504.0, 0.15625]], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().astype("<i2").tobytes()
    message = pb.Tensor(shape=[2, 4], dtype=pb.ELEMENT_TYPE_BFLOAT16, data=bits)
    decoded = decode(message)
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, values.float().numpy())


def test_a_size_that_does_not_match_the_bytes_is_refused():
    message = pb.Tensor(shape=[1000, 1000], dtype=pb.ELEMENT_TYPE_BFLOAT16, data=b"\x00" * 10)
    with pytest.raises(TensorDecodeError, match="needs 2000000"):
        decode(message)


@pytest.mark.parametrize(
    ("largest", "wire"), [(0, np.int16), (2**15 - 1, np.int16), (2**15, np.int32), (2**31, np.int64)]
)
def test_ids_travel_in_the_narrowest_type_that_holds_them_whatever_type_they_come_in(largest, wire):
    assert narrowest_ids(largest) == wire
    ids = np.array([[-1, 0], [largest, 3]])
    for given in {np.dtype(np.int64), narrowest_ids(largest)}:
        decoded = decode(encode_ids(ids.astype(given)))
        assert decoded.dtype == wire and np.array_equal(decoded, ids)
