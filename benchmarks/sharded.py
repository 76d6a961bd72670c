"""W1's LoRA step sharded over 8 simulated CPU devices vs on one device.

Correctness of scaling, not speed: on one 2-core CPU the eight "devices" share
the same cores, so the sharded step is expected to be slower. Reports both
losses (they must agree) and the step-time ratio, for both engines, with the
base sharded FSDP x tensor-parallel over a (data=4, model=2) mesh and the
batch split over `data`.

    python benchmarks/sharded.py
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import re
import sys

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import w1

import lora_jax as lj


def kernel_spec(path: str, ndim: int) -> P:
  """FSDP on `data`, tensor parallel on `model` (Megatron-style pairs)."""
  if re.search(r"/(q|k|v|fc1)/kernel$", path):
    return P("data", "model")
  if re.search(r"/(o|fc2)/kernel$", path) or path == "head/kernel":
    return P("model", "data")
  return P(*([None] * ndim))


def main(reps: int = 7):
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))
  size = w1.SIZES["w1"]
  apply, params, base, delta, tokens = w1.setup(size)
  sharded_params = lj.map_with_paths(
      lambda p, x: jax.device_put(x, NamedSharding(mesh, kernel_spec(p, x.ndim))),
      params)
  sbase, sdelta = lj.split(sharded_params, lj.LoraConfig(
      rank=8, alpha=16.0, targets=w1.TARGETS), jax.random.key(2),
      apply_fn=apply, example_args=(tokens,))
  stokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
  tx = optax.adam(1e-4)
  steps = {}
  for mode in ("merge", "factored"):
    wrapped = lj.wrap(apply, mode)

    def step(state, base, x, wrapped=wrapped):
      d, opt = state
      l, g = jax.value_and_grad(
          lambda d: w1.cross_entropy(wrapped(base, d, x), x))(d)
      u, opt = tx.update(g, opt, d)
      return (optax.apply_updates(d, u), opt), l
    fn = jax.jit(step)
    steps[f"{mode} 1 device"] = (fn, (delta, tx.init(delta)), base, tokens)
    steps[f"{mode} 8 devices"] = (fn, (sdelta, tx.init(sdelta)), sbase, stokens)
  out = {}
  for name, (fn, state, b, x) in steps.items():
    exe = fn.lower(state, b, x).compile()
    _, loss = exe(state, b, x)
    out[name] = {"exe": exe, "state": state, "base": b, "x": x,
                 "loss": float(loss), "times": []}
  import statistics
  import time
  for _ in range(reps):
    for r in out.values():
      t0 = time.perf_counter()
      jax.block_until_ready(r["exe"](r["state"], r["base"], r["x"]))
      r["times"].append(time.perf_counter() - t0)
  results = {name: {"loss": r["loss"],
                    "step_ms": 1e3 * statistics.median(r["times"])}
             for name, r in out.items()}
  lines = ["| engine | 1 device (ms) | 8 devices (ms) | ratio | loss 1 device | "
           "loss 8 devices |", "|---|---|---|---|---|---|"]
  for mode in ("merge", "factored"):
    one, eight = results[f"{mode} 1 device"], results[f"{mode} 8 devices"]
    lines.append(f"| {mode} | {one['step_ms']:.1f} | {eight['step_ms']:.1f} | "
                 f"{eight['step_ms'] / one['step_ms']:.2f} | {one['loss']:.6f} | "
                 f"{eight['loss']:.6f} |")
  table = "\n".join(lines)
  print(table)
  report = {"environment": w1.environment(), "mesh": {"data": 4, "model": 2},
            "results": results}
  with open(os.path.join(w1.RESULTS, "sharded_cpu.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(w1.RESULTS, "sharded_cpu.md"), "w") as f:
    f.write("# W1 LoRA step, sharded on 8 simulated CPU devices vs 1 device\n\n"
            "Same cores either way: this checks scaling is correct, not fast.\n\n"
            + table + "\n")


if __name__ == "__main__":
  main()
