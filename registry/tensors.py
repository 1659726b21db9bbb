"""Reading safetensors headers without loading tensors (and without torch).

The registry validates shapes and checks files for corruption from the header alone: an
8-byte little-endian length, then that many bytes of JSON mapping tensor names to dtype,
shape and byte offsets into the data section that follows.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from registry.errors import AdapterWeightsError

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Return name -> TensorInfo for a safetensors file; raise AdapterWeightsError if corrupt."""
    fix = "the file is corrupt or truncated; save the adapter again with safetensors"
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise AdapterWeightsError(
                f"corrupt safetensors file {path}: {size} bytes, no header; {fix}"
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise AdapterWeightsError(
                f"corrupt safetensors header in {path}: header length {length} exceeds the file "
                f"size {size}; {fix}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterWeightsError(f"corrupt safetensors header in {path}: {err}; {fix}") from err
    if not isinstance(header, dict):
        raise AdapterWeightsError(f"corrupt safetensors header in {path}: not a JSON object; {fix}")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _parse_entry(path, name, entry, data_size, fix)
    return tensors


def _parse_entry(path: Path, name: str, entry: object, data_size: int, fix: str) -> TensorInfo:
    where = f"corrupt safetensors header in {path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise AdapterWeightsError(f"{where} has no dtype/shape entry; {fix}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise AdapterWeightsError(f"{where} has unknown dtype {dtype!r}; {fix}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise AdapterWeightsError(f"{where} has invalid shape {shape!r}; {fix}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise AdapterWeightsError(
            f"{where} has data offsets {offsets!r} outside the {data_size}-byte data section; {fix}"
        )
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise AdapterWeightsError(
            f"{where} spans {offsets[1] - offsets[0]} bytes but dtype {dtype} and shape {shape} "
            f"need {expected}; {fix}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape))
