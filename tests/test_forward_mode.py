"""Forward-mode differentiation (``jvp``, ``linearize``, ``jacfwd``, a
Hessian-vector product as ``jvp`` of ``grad``) through the factored engine
on float32, bf16 and nf4 bases: equal to the merge engine's on the same
kernels widened to float32.

With ``recompute=False`` every transform works, eagerly and under ``jit``:
a narrow kernel's product is then a ``custom_jvp`` whose tangent is linear.
With ``recompute=True`` (the default) the narrow products and recomputed
regions are ``custom_vjp`` functions; an eager ``jvp`` and ``jacfwd`` (eager
or jitted) fall back by themselves, a Hessian-vector product (``jvp`` of
``grad``) differentiates their rules, ``jvp`` under ``jit`` and
``linearize`` raise JAX's forward-mode error (README, Limitations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

D, H, N = 16, 32, 4


def _fn(p, x):
  # gelu(x @ w1) feeds w2: a recomputed region; w3 used transposed
  h = jax.nn.gelu(x @ p["w1"]["kernel"])
  h = jnp.tanh(h @ p["w2"]["kernel"])
  return h @ p["w3"]["kernel"].T


def _case(kind):
  k = jax.random.split(jax.random.key(0), 5)
  params = {"w1": {"kernel": jax.random.normal(k[0], (D, H)) / 4},
            "w2": {"kernel": jax.random.normal(k[1], (H, D)) / 6},
            "w3": {"kernel": jax.random.normal(k[2], (N, D)) / 4}}
  base, delta = lj.split(params, lj.LoraConfig(rank=2, alpha=2.0, targets=r".*kernel"),
                         jax.random.key(1))
  delta = jax.tree.map(lambda a: a + 0.1, delta)  # b != 0
  if kind == "bf16":
    base = jax.tree.map(lambda w: w.astype(jnp.bfloat16), base)
  elif kind == "nf4":
    base = lj.quantize(base, "nf4", block_size=4)
  wide = jax.tree.map(lambda w: w.astype(jnp.float32), lj.dequantize(base))
  x = jax.random.normal(k[3], (N, D))
  return base, wide, delta, x


def _transforms(g):
  """``{name: function of (delta, x, t_delta, t_x)}`` for ``g(delta, x)``."""
  loss = lambda d, x: jnp.sum(jnp.sin(g(d, x)))
  return {
      "jvp": lambda d, x, td, tx: jax.jvp(g, (d, x), (td, tx))[1],
      "linearize": lambda d, x, td, tx: jax.linearize(g, d, x)[1](td, tx),
      "jacfwd": lambda d, x, td, tx: jax.jacfwd(g, argnums=1)(d, x),
      "hvp": lambda d, x, td, tx: jax.jvp(
          jax.grad(loss, argnums=(0, 1)), (d, x), (td, tx))[1],
      "grad": lambda d, x, td, tx: jax.grad(loss, argnums=(0, 1))(d, x),
  }


def _all(g, names):
  """The transforms ``names`` of ``g`` in one jitted program."""
  fs = _transforms(g)
  return jax.jit(lambda *a: {k: fs[k](*a) for k in names})


@pytest.fixture(scope="module", params=["bf16", "nf4"])
def case(request):
  """A narrow base (float32 bases: tests/test_recompute.py, test_engine_zoo),
  tangents, and the merge engine's results on the widened kernels."""
  base, wide, delta, x = _case(request.param)
  td = jax.tree.map(lambda a: jnp.cos(a) + 0.5, delta)
  tx = jnp.sin(x) + 0.1
  want = _all(lambda d, x: lj.wrap(_fn, "merge")(wide, d, x),
              ["jvp", "jacfwd", "hvp", "grad"])(delta, x, td, tx)
  return base, delta, x, td, tx, want


def _close(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5,
                               atol=2e-5 * max(1.0, np.abs(b).max()))


def test_without_recompute_every_transform_works(case):
  """jvp, jacfwd, a Hessian-vector product and reverse mode (which
  transposes the forward-capable product) under jit; linearize eagerly."""
  base, delta, x, td, tx, want = case
  g = lambda d, x: lj.wrap(_fn, "factored", recompute=False)(base, d, x)
  names = ["jvp", "jacfwd", "hvp", "grad"]
  got = _all(g, names)(delta, x, td, tx)
  for name in names:
    _close(got[name], want[name])
  _close(_transforms(g)["linearize"](delta, x, td, tx), want["jvp"])


def test_with_recompute_as_documented(case):
  base, delta, x, td, tx, want = case
  g = lambda d, x: lj.wrap(_fn, "factored")(base, d, x)
  fs = _transforms(g)
  # fall back by themselves (JAX refuses the custom_vjp while tracing):
  # an eager jvp, jacfwd under jit; reverse mode as ever
  _close(fs["jvp"](delta, x, td, tx), want["jvp"])
  # forward over reverse runs the custom_vjps' rules, which are plain code
  got = _all(g, ["jacfwd", "hvp", "grad"])(delta, x, td, tx)
  for name in ("jacfwd", "hvp", "grad"):
    _close(got[name], want[name])
  # JAX raises once the program is lowered or the linear map evaluated
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jit(fs["jvp"])(delta, x, td, tx)
  with pytest.raises(TypeError, match="forward-mode"):
    fs["linearize"](delta, x, td, tx)
