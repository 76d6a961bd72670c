"""LoRA training across processes: ``jax.distributed`` + a global device mesh.

Run one copy per process (here: on one machine, CPU devices simulated)::

    python -m lora_jax.examples.multihost --num-processes 2 --process-id 0 &
    python -m lora_jax.examples.multihost --num-processes 2 --process-id 1

On a TPU pod, drop the flags: ``jax.distributed.initialize()`` finds the
coordinator and process ids itself, and every host runs the same script.

Every process builds the same base model (same seed), shards it over a
``(data, model)`` mesh spanning all processes' devices (``jax.make_mesh``:
Explicit axes from JAX 0.9, entered with ``jax.set_mesh``), splits it (the LoRA
factors land on shardings derived from the kernels'), trains a few Adam steps
on a global batch that each process fills for its own devices, and saves the
adapter: each process writes its own shards into one checkpoint. Prints one
JSON line with the losses (process 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--coordinator", default="127.0.0.1:12355",
                 help="host:port of process 0")
  p.add_argument("--devices-per-process", type=int, default=4,
                 help="simulated CPU devices per process (CPU only)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--mode", default="factored", choices=("merge", "factored"))
  p.add_argument("--out", default=None, help="save the adapter here")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count="
                             f"{args.devices_per_process}")
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np
  import optax

  import lora_jax as lj

  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id)
  n = jax.device_count()
  # Explicit axes by default from JAX 0.9 (sharding in types), Auto before
  mesh = jax.make_mesh((n // 2, 2), ("data", "model"))
  explicit = jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)
  set_mesh = (getattr(jax, "set_mesh", None)
              or jax.sharding.use_mesh)  # type: ignore[attr-defined]  # < 0.7

  # The same base everywhere: built from a seed, then sharded over the mesh.
  k = jax.random.split(jax.random.key(0), 4)
  params = {"fc1": jax.random.normal(k[0], (32, 64)) * 0.2,
            "fc2": jax.random.normal(k[1], (64, 32)) * 0.2,
            "head": jax.random.normal(k[2], (32, 8)) * 0.2}
  specs = {"fc1": P(None, "model"), "fc2": P("model", None),
           "head": P(None, None)}

  def fn(p, x):
    h = jax.nn.gelu(x @ p["fc1"])  # column-parallel
    if explicit:  # row-parallel: explicit axes ask where the sum goes
      h = jax.lax.dot_general(h, p["fc2"], (((1,), (0,)), ((), ())),
                              out_sharding=P("data", None))
    else:
      h = h @ p["fc2"]
    return jax.nn.gelu(h) @ p["head"]
  place = lambda v, s: jax.make_array_from_callback(
      v.shape, NamedSharding(mesh, s), lambda idx: np.asarray(v)[idx])
  base = {name: place(v, specs[name]) for name, v in params.items()}
  x_all = np.asarray(jax.random.normal(k[3], (8 * n, 32)))
  y_all = np.sin(x_all[:, :8])
  x, y = place(x_all, P("data")), place(y_all, P("data"))

  cfg = lj.LoraConfig(rank=4, alpha=8.0, targets="fc1|fc2")
  apply = lj.wrap(fn, args.mode)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(delta, opt, base, x, y):
    loss, g = jax.value_and_grad(
        lambda d: jnp.mean((apply(base, d, x) - y) ** 2))(delta)
    u, opt = tx.update(g, opt, delta)
    return optax.apply_updates(delta, u), opt, loss

  with set_mesh(mesh):
    base, delta = lj.split(base, cfg, jax.random.key(1))
    opt, losses = tx.init(delta), []
    for _ in range(args.steps):
      delta, opt, loss = step(delta, opt, base, x, y)
      losses.append(float(loss))
  # saved outside the mesh context (orbax < 0.12 on jax 0.6.2 slices arrays
  # on one device, which that JAX refuses under use_mesh)
  if args.out:
    lj.save(args.out, delta, cfg, overwrite=True)
  result = {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": n, "losses": losses}
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return result


if __name__ == "__main__":
  main()
  sys.exit(0)
