"""The one tensor codec: numpy arrays (and anything with `__array__` or `.numpy()`, torch included) to
and from the `rebalancer.v1.Tensor` message, as shape + element type + raw little-endian bytes.

Decoding validates before it allocates: the declared shape must be sane and the byte length must equal
prod(shape) * itemsize, so a message claiming a 10**9-element tensor is refused without touching memory.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .v1 import rebalancer_pb2 as pb

ElementType = pb.ElementType

_TO_NUMPY: dict[int, np.dtype] = {
    pb.ELEMENT_TYPE_FLOAT32: np.dtype("<f4"),
    pb.ELEMENT_TYPE_FLOAT64: np.dtype("<f8"),
    pb.ELEMENT_TYPE_FLOAT16: np.dtype("<f2"),
    pb.ELEMENT_TYPE_INT16: np.dtype("<i2"),
    pb.ELEMENT_TYPE_INT32: np.dtype("<i4"),
    pb.ELEMENT_TYPE_INT64: np.dtype("<i8"),
}
_BFLOAT16_BITS = np.dtype("<u2")
_FROM_NUMPY: dict[str, int] = {
    "float32": pb.ELEMENT_TYPE_FLOAT32,
    "float64": pb.ELEMENT_TYPE_FLOAT64,
    "float16": pb.ELEMENT_TYPE_FLOAT16,
    "int16": pb.ELEMENT_TYPE_INT16,
    "int32": pb.ELEMENT_TYPE_INT32,
    "int64": pb.ELEMENT_TYPE_INT64,
}


class TensorDecodeError(ValueError):
    """A Tensor message that cannot be decoded; `reason` says why in words fit for a field violation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def as_numpy(value: Any) -> np.ndarray:
    """numpy array, torch tensor (via duck typing, torch is never imported) or nested lists -> ndarray."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def encode(value: Any) -> pb.Tensor:
    """Array-like -> Tensor message (bool and unsigned types widen to int64; bfloat16 to float32)."""
    array = as_numpy(value)
    if array.dtype == np.bool_ or array.dtype.kind == "u":
        array = array.astype(np.int64)
    name = array.dtype.name
    if name not in _FROM_NUMPY:
        raise TypeError(f"cannot encode arrays of dtype {array.dtype}; use float32/64, float16 or int16/32/64")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return pb.Tensor(shape=list(array.shape), dtype=_FROM_NUMPY[name], data=np.ascontiguousarray(little).tobytes())


def narrowest_ids(largest: int) -> np.dtype:
    """The narrowest of int16/int32/int64 that holds every id in [-largest, largest]."""
    for dtype in (np.int16, np.int32):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def encode_ids(value: Any) -> pb.Tensor:
    """Integer ids (placement maps, -1 padding) in the narrowest of int16/int32/int64 that holds them.

    An int16 array is sent as it is: no narrower type exists, so its range needs no scan.
    """
    array = as_numpy(value)
    if array.dtype == np.int16:
        return encode(array)
    largest = max(int(array.max()), -int(array.min())) if array.size else 0  # no |array| temporary
    return encode(array.astype(narrowest_ids(largest)))


def decode(message: pb.Tensor, *, max_elements: int | None = None, max_dims: int = 8) -> np.ndarray:
    """Tensor message -> read-only ndarray view of its bytes; raises TensorDecodeError when malformed.

    bfloat16 (no numpy type) arrives as its raw 16-bit patterns and is widened to float32, exactly: a
    bfloat16 value is the upper half of the float32 with the same bits.
    """
    bfloat16 = message.dtype == pb.ELEMENT_TYPE_BFLOAT16
    dtype = _BFLOAT16_BITS if bfloat16 else _TO_NUMPY.get(message.dtype)
    if dtype is None:
        name = ElementType.Name(message.dtype) if message.dtype in ElementType.values() else str(message.dtype)
        raise TensorDecodeError(f"unsupported dtype {name}")
    shape = tuple(int(d) for d in message.shape)
    if len(shape) > max_dims:
        raise TensorDecodeError(f"{len(shape)} dimensions, at most {max_dims} allowed")
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise TensorDecodeError(f"{count} elements, at most {max_elements} allowed")
    expected = count * dtype.itemsize
    if len(message.data) != expected:
        raise TensorDecodeError(
            f"data holds {len(message.data)} bytes, shape {list(shape)} of {dtype.name} needs {expected}"
        )
    array = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    return (array.astype("<u4") << 16).view("<f4") if bfloat16 else array
