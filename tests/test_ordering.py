"""``ordering.after``: values made to wait for an anchor come back bit for
bit (a NaN as a NaN: float arithmetic may canonicalise its payload, as JAX
0.12 does for float8_e5m2), whatever the anchor holds and whatever the
values' dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax._src.factored import ordering

SPECIALS = [0.0, -0.0, 1.5, -2.0, 3.0, float("inf"), float("-inf"),
            float("nan")]


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == bool:
    return x
  if x.dtype.itemsize == 1 or x.dtype.kind == "V":
    return x.view(np.uint8)
  return x.view(f"u{x.dtype.itemsize}")


def _values(dtype):
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    vals = SPECIALS
    if dtype == jnp.float8_e4m3fn:  # no infinities in this format
      vals = [v for v in SPECIALS if not np.isinf(v)]
    return jnp.asarray(np.array(vals, np.float32)).astype(dtype)
  if dtype == jnp.bool_:
    return jnp.asarray([True, False, True])
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.asarray([1 + 2j, -0.0 - 0.0j, complex(float("nan"), 1)],
                       dtype)
  return jnp.arange(-3, 4).astype(dtype) if jnp.issubdtype(
      dtype, jnp.signedinteger) else jnp.arange(7).astype(dtype)


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn,
          jnp.float8_e5m2, jnp.int8, jnp.uint8, jnp.int32, jnp.int4,
          jnp.bool_, jnp.complex64]
ANCHORS = {
    "nan": jnp.asarray([float("nan"), 1.0]),
    "inf": jnp.asarray([float("-inf"), float("inf")], jnp.bfloat16),
    "minus zero": jnp.asarray([-0.0, -0.0]),
    "int codes": jnp.asarray([-128, 127], jnp.int8),
    "one element": jnp.asarray([float("nan")]),
}


@pytest.mark.parametrize("anchor", sorted(ANCHORS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_values_come_back_bit_for_bit(anchor, jit):
  values = {str(jnp.dtype(d)): _values(d) for d in DTYPES}
  fn = jax.jit(ordering.after) if jit else ordering.after
  got = fn(values, ANCHORS[anchor])
  for name, want in values.items():
    assert got[name].dtype == want.dtype, name
    _assert_same(got[name], want, name)


def _assert_same(got, want, name):
  if jnp.issubdtype(want.dtype, jnp.floating):
    nan = np.isnan(np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.isnan(np.asarray(got, np.float32)), nan,
                                  err_msg=name)
    got, want = got[~nan], want[~nan]
  np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)


def test_no_numeric_anchor_leaves_values_alone():
  values = [jnp.asarray([1.0, -0.0])]
  got = jax.jit(ordering.after)(values, [jnp.asarray([True])])
  _assert_same(got[0], values[0], "values")


def test_values_wait_for_the_anchor_in_the_compiled_program():
  """The dependency survives XLA's simplifier: the compiled program still
  counts bits of the anchor, and no output is folded to a constant."""
  fn = jax.jit(lambda v, a: ordering.after(v, a))
  text = fn.lower(jnp.ones(8), jnp.ones(4)).compile().as_text()
  assert "popcnt(" in text
