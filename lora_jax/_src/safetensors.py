"""The safetensors file format, read and written with numpy alone.

A file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``,
padded with spaces so the data starts 8-byte aligned), then the tensors' raw
little-endian bytes, back to back; ``data_offsets`` count from the end of the
header. This is what PEFT writes as ``adapter_model.safetensors``; lora_jax
needs no safetensors package to read or write it.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

# safetensors' dtype names and the numpy dtypes (little-endian) they hold.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}
# A header larger than this is a corrupt file, not an adapter (the reference
# implementation refuses headers over 100 MB too).
_MAX_HEADER = 100_000_000
# The largest array numpy makes (bytes, zero-length axes not counted).
_MAX_BYTES = int(np.iinfo(np.intp).max)
# JSON nested deeper than this is not a header (nor an adapter config).
MAX_DEPTH = 64


def nested_too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
  """The key of the first top-level entry of a JSON object nested more than
  ``limit`` levels deep, or None; iterative, so any depth is safe.

  >>> nested_too_deep({"a": [[1]], "b": 2}, limit=2)
  'a'
  """
  for key, item in value.items():
    stack = [(item, 1)]
    while stack:
      v, depth = stack.pop()
      if depth > limit:
        return key
      if isinstance(v, dict):
        stack.extend((x, depth + 1) for x in v.values())
      elif isinstance(v, list):
        stack.extend((x, depth + 1) for x in v)
  return None


class SafetensorsError(ValueError):
  """A file that is not valid safetensors; the message names the file."""


def dtype_name(dtype: Any) -> str:
  """safetensors' name of a numpy dtype (``"F32"``, ``"BF16"`` ...).

  >>> dtype_name(np.float16)
  'F16'
  """
  dt = np.dtype(dtype)
  dt = dt.newbyteorder("<") if dt.byteorder == ">" else dt
  if dt not in _NAMES:
    raise ValueError(f"safetensors has no dtype for {np.dtype(dtype)}; use one "
                     f"of {sorted(DTYPES)}.")
  return _NAMES[dt]


def to_bytes(tensors: Mapping[str, Any],
             metadata: Mapping[str, str] | None = None) -> bytes:
  """The safetensors encoding of ``{name: array}``, tensors in name order.

  Args:
    tensors: arrays (anything ``np.asarray`` takes) by name.
    metadata: optional ``{str: str}`` for the ``__metadata__`` entry.

  Returns:
    The file's bytes.

  >>> data = to_bytes({"x": np.array([1.0], np.float32)})
  >>> data[:8], data[8:]
  (b'8\\x00\\x00\\x00\\x00\\x00\\x00\\x00', b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}  \\x00\\x00\\x80?')
  """
  header: dict[str, Any] = {}
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str)
               for k, v in metadata.items()):
      raise ValueError(f"safetensors metadata must map str to str, got "
                       f"{dict(metadata)!r}.")
    header["__metadata__"] = dict(metadata)
  blobs, offset = [], 0
  for name in sorted(tensors):
    if name == "__metadata__":
      raise ValueError("'__metadata__' is reserved and cannot name a tensor.")
    x = np.asarray(tensors[name])
    kind = dtype_name(x.dtype)
    blob = np.ascontiguousarray(x, DTYPES[kind]).tobytes()
    header[name] = {"dtype": kind, "shape": list(x.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # data 8-byte aligned, as the reference
  return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def from_bytes(data: bytes, where: str = "<bytes>"
               ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Decodes a safetensors file, checking every offset.

  Args:
    data: the file's bytes.
    where: the file's name, for error messages.

  Returns:
    ``(tensors, metadata)``: ``{name: np.ndarray}`` (native byte order) and
    the ``__metadata__`` dict (empty if absent).

  >>> t, m = from_bytes(to_bytes({"x": np.arange(3, dtype=np.int64)}, {"a": "b"}))
  >>> t, m
  ({'x': array([0, 1, 2])}, {'a': 'b'})
  """
  def bad(why: str) -> SafetensorsError:
    return SafetensorsError(f"{where} is not a valid safetensors file: {why}.")

  if len(data) < 8:
    raise bad(f"it has {len(data)} bytes, fewer than the 8 of the header "
              f"length")
  (n,) = struct.unpack("<Q", data[:8])
  if n > min(_MAX_HEADER, len(data) - 8):
    raise bad(f"the header length {n} runs past the end of the file "
              f"({len(data)} bytes)")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"the header is not JSON ({e})") from None
  except RecursionError:
    raise bad("the header's JSON is nested too deeply to read") from None
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  deep = nested_too_deep(header)
  if deep is not None:
    raise bad(f"the header entry {deep!r} is nested more than {MAX_DEPTH} "
              f"levels deep")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
      isinstance(v, str) for v in metadata.values()):
    raise bad("__metadata__ must map str to str")
  body = memoryview(data)[8 + n:]
  tensors, spans = {}, []
  for name, info in header.items():
    tensors[name] = _decode(name, info, body, bad)
    spans.append((*info["data_offsets"], name))
  end = 0
  for begin, stop, name in sorted(spans):
    if begin != end:
      raise bad(f"tensor {name!r} starts at byte {begin}, expected {end} "
                f"(tensors must be back to back)")
    end = stop
  if end != len(body):
    raise bad(f"the tensors end at byte {end} but the data has {len(body)} "
              f"bytes")
  return tensors, dict(metadata)


def _decode(name: str, info: Any, body: memoryview, bad) -> np.ndarray:
  ok = isinstance(info, dict) and set(info) == {"dtype", "shape",
                                                "data_offsets"}
  if not ok:
    raise bad(f"the entry of {name!r} must have exactly dtype, shape and "
              f"data_offsets, got {info!r}")
  kind, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if kind not in DTYPES:
    raise bad(f"tensor {name!r} has dtype {kind!r}, not one of "
              f"{sorted(DTYPES)}")
  ints = lambda v: isinstance(v, list) and all(
      isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
  if not ints(shape) or not ints(offsets) or len(offsets) != 2:
    raise bad(f"tensor {name!r} needs a shape and two data_offsets of "
              f"non-negative ints, got {shape!r} and {offsets!r}")
  begin, stop = offsets
  # numpy's own limit, zero-length axes aside: [0, 2**62] holds no byte but
  # is no array numpy can make.
  if math.prod(d for d in shape if d) * DTYPES[kind].itemsize > _MAX_BYTES:
    raise bad(f"tensor {name!r} has shape {shape}, larger than any array "
              f"({_MAX_BYTES} bytes)")
  size = math.prod(shape) * DTYPES[kind].itemsize
  if stop - begin != size or stop > len(body):
    raise bad(f"tensor {name!r} ({kind}{shape}) needs {size} bytes but its "
              f"data_offsets {offsets} span {stop - begin} of a {len(body)}-"
              f"byte data section")
  x = np.frombuffer(body[begin:stop], DTYPES[kind]).reshape(shape)
  return x.astype(x.dtype.newbyteorder("="), copy=True)


def save_file(path: str | os.PathLike, tensors: Mapping[str, Any],
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` to ``path`` in the safetensors format.

  Args:
    path: the file to write.
    tensors: arrays by name.
    metadata: optional ``{str: str}``.

  Returns:
    None.

  >>> import tempfile, os
  >>> f = os.path.join(tempfile.mkdtemp(), "x.safetensors")
  >>> save_file(f, {"w": np.ones((2, 2), np.float32)})
  >>> load_file(f)[0]["w"].sum()
  np.float32(4.0)
  """
  data = to_bytes(tensors, metadata)
  with open(path, "wb") as f:
    f.write(data)


def load_file(path: str | os.PathLike
              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a safetensors file: ``(tensors, metadata)`` (see
  :func:`from_bytes`).

  Args:
    path: the file to read.

  Returns:
    ``({name: np.ndarray}, {str: str})``.

  >>> import tempfile, os
  >>> f = os.path.join(tempfile.mkdtemp(), "x.safetensors")
  >>> save_file(f, {"w": np.zeros(3, np.float16)}, {"format": "pt"})
  >>> load_file(f)[1]
  {'format': 'pt'}
  """
  with open(path, "rb") as f:
    return from_bytes(f.read(), os.fspath(path))
