"""lora_jax's safetensors reader and writer (lora_jax/_src/safetensors.py):
the bytes against hand-built files, bitwise round trips, every malformed
file's error, and agreement with the format's own package (the interop
extra; a failure, not a skip, with LORA_JAX_INTEROP=1)."""

import os
import struct

from helpers import safetensors_bytes
import ml_dtypes
import numpy as np
import pytest

from lora_jax._src import safetensors as st


@pytest.fixture(scope="module")
def reference():
  """The safetensors package's numpy API, or a skip (a failure with
  LORA_JAX_INTEROP=1, where CI installs the interop extra)."""
  try:
    import safetensors.numpy
  except ImportError as e:
    if os.environ.get("LORA_JAX_INTEROP") == "1":
      pytest.fail(f"LORA_JAX_INTEROP=1 but {e}: install lora_jax[interop].")
    pytest.skip("needs the safetensors package: pip install -e .[interop] "
                "(CI runs it on the py311-oldest leg)")
  return safetensors


HAND = safetensors_bytes(
    b'{"__metadata__":{"format":"pt"},'
    b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    b'"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}',
    struct.pack("<2f", 1.5, -2.0) + b"\x80\x3f\x00\xbf")  # bf16 1.0, -0.5


def test_safetensors_writer_gives_the_hand_built_bytes():
  data = st.to_bytes({"b": np.array([[1.0, -0.5]], ml_dtypes.bfloat16),
                      "a": np.array([1.5, -2.0], np.float32)}, {"format": "pt"})
  assert data == HAND


def test_safetensors_reader_reads_hand_built_bytes_in_any_order():
  tensors, meta = st.from_bytes(HAND)
  assert meta == {"format": "pt"}
  np.testing.assert_array_equal(tensors["a"], np.array([1.5, -2.0], np.float32))
  assert tensors["b"].dtype == ml_dtypes.bfloat16 and tensors["b"].shape == (1, 2)
  np.testing.assert_array_equal(tensors["b"].astype(np.float32), [[1.0, -0.5]])
  # Header order and data order need not agree with the names' order.
  other = safetensors_bytes(
      b'{"z":{"dtype":"I64","shape":[],"data_offsets":[8,16]},'
      b'"y":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}',
      np.array([1, 2, 3, 4], "<f2").tobytes() + struct.pack("<q", -7))
  tensors, meta = st.from_bytes(other)
  assert meta == {} and tensors["z"].dtype == np.int64 and tensors["z"] == -7
  np.testing.assert_array_equal(tensors["y"], [[1, 2], [3, 4]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16,
                                   ml_dtypes.bfloat16, np.int64, np.int32,
                                   np.int8, np.uint8, np.bool_, ">f4"])
def test_safetensors_round_trip_is_bitwise(dtype):
  x = (np.arange(-6, 6) * 1.25).reshape(3, 4).astype(dtype)
  tensors, _ = st.from_bytes(st.to_bytes({"x": x, "e": np.zeros((0, 3), dtype)}))
  assert tensors["x"].tobytes() == x.astype(x.dtype.newbyteorder("=")).tobytes()
  assert tensors["x"].shape == (3, 4) and tensors["e"].shape == (0, 3)


_F32 = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'


@pytest.mark.parametrize("data, message", [
    (b"\x01\x02", "it has 2 bytes, fewer than the 8 of the header length"),
    (struct.pack("<Q", 99) + b"{}", "the header length 99 runs past the end"),
    (safetensors_bytes(b"{not json", b""), "the header is not JSON"),
    (safetensors_bytes(b"[1]", b""), "the header is not a JSON object"),
    (safetensors_bytes(b'{"__metadata__":{"a":1}}', b""),
     "__metadata__ must map str to str"),
    (safetensors_bytes(b'{"x":{"dtype":"F32","shape":[1]}}', b""),
     "the entry of 'x' must have exactly dtype, shape and data_offsets"),
    (safetensors_bytes(b'{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}',
                 bytes(8)), "tensor 'x' has dtype 'C64', not one of"),
    (safetensors_bytes(b'{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}',
                 bytes(4)), "tensor 'x' needs a shape and two data_offsets of "
     "non-negative ints"),
    (safetensors_bytes(_F32, bytes(4)), "tensor 'x' (F32[2]) needs 8 bytes but its "
     "data_offsets [0, 8] span 8 of a 4-byte data section"),
    (safetensors_bytes(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
                 bytes(8)), "tensor 'x' starts at byte 4, expected 0"),
    (safetensors_bytes(_F32, bytes(12)), "the tensors end at byte 8 but the data "
     "has 12 bytes"),
])
def test_safetensors_reader_errors(data, message):
  with pytest.raises(st.SafetensorsError) as e:
    st.from_bytes(data, "f.safetensors")
  assert str(e.value).startswith("f.safetensors is not a valid safetensors "
                                 "file: ")
  assert message in str(e.value)


def test_safetensors_writer_errors():
  with pytest.raises(ValueError, match=r"safetensors has no dtype for "
                     r"complex64; use one of \['BF16', "):
    st.to_bytes({"x": np.zeros(2, np.complex64)})
  with pytest.raises(ValueError, match="safetensors metadata must map str to "
                     "str, got {'a': 1}"):
    st.to_bytes({}, {"a": 1})
  with pytest.raises(ValueError, match="'__metadata__' is reserved and "
                     "cannot name a tensor"):
    st.to_bytes({"__metadata__": np.zeros(1)})


def test_safetensors_agrees_with_the_reference_package(reference, tmp_path):
  safetensors = reference
  tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
             "h": np.array([1.5, -2.0], np.float16),
             "i": np.array([3, -4], np.int64)}
  st.save_file(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
  theirs = safetensors.numpy.load_file(str(tmp_path / "ours.safetensors"))
  safetensors.numpy.save_file(tensors, str(tmp_path / "theirs.safetensors"),
                              metadata={"format": "pt"})
  ours, meta = st.load_file(tmp_path / "theirs.safetensors")
  assert meta == {"format": "pt"}
  for k, x in tensors.items():
    np.testing.assert_array_equal(theirs[k], x)
    np.testing.assert_array_equal(ours[k], x)
    assert ours[k].dtype == x.dtype and theirs[k].dtype == x.dtype
