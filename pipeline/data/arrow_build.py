"""Arrow arrays and scalars built from NumPy buffers, for ingest's hot path, without importing pandas.

pyarrow imports pandas (about half a second to a second) the first time it converts a
Python or NumPy object (``pa.array(list)``, ``pa.array(ndarray)``, ``pa.scalar``, or a
plain value or NumPy array handed to a compute function), to check whether it is a
pandas object. Building from buffers skips that check; ingest's clean path uses only
these, so ``lldm-dpo ingest`` never pays for pandas on clean input.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa


def int64_array(values: np.ndarray) -> pa.Array:
    """An int64 array (no nulls) holding ``values``."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def bool_array(values: np.ndarray) -> pa.Array:
    """A boolean array (no nulls) holding ``values``."""
    values = np.asarray(values, dtype=bool)
    bits = np.packbits(values, bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def string_array(texts: list[str]) -> pa.Array:
    """A string array (no nulls) holding ``texts``."""
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded)), out=offsets[1:])
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def choose_strings(mask: np.ndarray, if_true: str, if_false: str) -> pa.Array:
    """A string array with ``if_true`` where ``mask`` holds, else ``if_false``."""
    pick = pa.py_buffer(np.asarray(mask, dtype=bool).astype(np.int8))
    indices = pa.Array.from_buffers(pa.int8(), len(mask), [None, pick])
    return pa.DictionaryArray.from_arrays(indices, string_array([if_false, if_true])).dictionary_decode()


@functools.lru_cache(maxsize=256)
def scalar(value: bool | int | str, type: pa.DataType | None = None) -> pa.Scalar:
    """A scalar of ``value`` (bool, int64 unless ``type`` says otherwise, or string); the same few are asked for
    in every chunk, so they are kept."""
    if isinstance(value, str):
        return string_array([value])[0]
    if isinstance(value, bool):
        return bool_array(np.array([value]))[0]
    array = int64_array(np.array([value]))
    return array[0] if type is None or type == pa.int64() else array.cast(type)[0]


def bools_of(array: pa.Array) -> np.ndarray:
    """A boolean array's values as NumPy (null as False), read from its buffers (``to_numpy`` imports pandas)."""
    n, offset = len(array), array.offset
    validity, data = array.buffers()
    values = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[offset : offset + n].astype(bool)
    if array.null_count and validity is not None:
        values &= np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")[offset : offset + n].astype(bool)
    return values


def ints_of(array: pa.Array) -> np.ndarray:
    """An integer array without nulls as NumPy (a view of its buffer)."""
    return np.frombuffer(array.buffers()[1], dtype=_NUMPY_INTS[array.type])[array.offset : array.offset + len(array)]


def string_offsets(array: pa.Array) -> np.ndarray:
    """A string array's ``len + 1`` int32 byte offsets into its data buffer (``array.buffers()[2]``), for its slice
    (a view of its buffer)."""
    return np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]


_NUMPY_INTS = {pa.int32(): np.int32, pa.int64(): np.int64, pa.uint64(): np.uint64}
