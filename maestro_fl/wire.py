"""Arrays on the wire: NumPy's ``.npy`` bytes, as Flower's ``Array`` holds them, without its per-array overhead.

Flower's ``Array(ndarray)`` writes each array with ``np.save`` and reads it
back with ``np.load``, parsing the header (``ast.literal_eval``) every time;
with ~20 arrays per message and 100 messages a round that was most of the
server's time. The bytes here are the same ``.npy`` format (so
``Array.numpy()`` reads them), with the header built or parsed once per
distinct dtype and shape. Headers are parsed by NumPy's own reader, and
object dtypes are refused: nothing on the wire can run code.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

NUMPY_STYPE = "numpy.ndarray"  # Flower's SType.NUMPY
_MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=4096)
def _header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def encode(array: np.ndarray) -> tuple[str, tuple[int, ...], str, bytes]:
    """``(dtype, shape, stype, npy bytes)``: the fields of Flower's ``Array``, C-ordered."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        array = array.copy(order="C")
    if array.dtype.hasobject:
        raise TypeError("object arrays cannot travel")
    dtype, shape = str(array.dtype), tuple(int(d) for d in array.shape)
    return dtype, shape, NUMPY_STYPE, _header(array.dtype.str, shape) + array.tobytes()


def message_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """The bytes ``arrays`` take in a message once encoded by :func:`encode`: every array's ``.npy`` header and
    data, and its name (what Flower's ``ArrayRecord.count_bytes`` counts), without encoding anything."""
    return sum(len(_header(np.asarray(v).dtype.str, tuple(int(d) for d in np.shape(v)))) + np.asarray(v).nbytes
               + len(k) for k, v in arrays.items())


@lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    buffer = io.BytesIO(header)
    version = np.lib.format.read_magic(buffer)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(buffer)  # NumPy's own parser (ast.literal_eval)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    if buffer.tell() != len(header):
        raise ValueError("malformed .npy header")
    return dtype, tuple(shape), bool(fortran)


def decode(stype: str, data: bytes) -> np.ndarray:
    """The array held by an ``Array``'s ``stype`` and ``data`` (read-only, no copy); ``ValueError`` otherwise."""
    if stype != NUMPY_STYPE:
        raise ValueError(f"unsupported serialization {str(stype)[:40]!r}")
    if not isinstance(data, (bytes, bytearray)) or data[:6] != _MAGIC or len(data) < 12:
        raise ValueError("not .npy bytes")
    major = data[6]
    hlen = int.from_bytes(data[8:10], "little") if major == 1 else int.from_bytes(data[8:12], "little")
    start = (10 if major == 1 else 12) + hlen
    try:
        dtype, shape, fortran = _parse_header(bytes(data[:start]))
    except (SyntaxError, TypeError) as err:  # numpy reports some broken headers this way
        raise ValueError(f"malformed .npy header: {err}") from None
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"{len(data) - start} bytes of data for shape {shape} of {dtype}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape, order="F" if fortran else "C")
