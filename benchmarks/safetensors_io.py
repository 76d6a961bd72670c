"""lora_jax's own safetensors reader/writer against the `safetensors` package.

Measures what decides whether the PEFT path should depend on the package
(issue 20): speed on a 1 GiB file (write, then read, medians of interleaved
repetitions), what each does with the malformed files of
``tests/test_peft.py::test_safetensors_reader_errors`` plus a few more, and
the package's installed size. Needs ``pip install safetensors``. Writes
``benchmarks/results/safetensors_io.json`` and ``.md``.

    python benchmarks/safetensors_io.py
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import sys
import tempfile
import time

import numpy as np
import safetensors
import safetensors.numpy as stnp

from lora_jax._src import safetensors as ours

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _hand_built(header: bytes, data: bytes) -> bytes:
  return struct.pack("<Q", len(header)) + header + data


_F32 = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
MALFORMED = {
    "2 bytes": b"\x01\x02",
    "header length past the end": struct.pack("<Q", 99) + b"{}",
    "header not JSON": _hand_built(b"{not json", b""),
    "header a list": _hand_built(b"[1]", b""),
    "metadata not str->str": _hand_built(b'{"__metadata__":{"a":1}}', b""),
    "entry missing offsets": _hand_built(b'{"x":{"dtype":"F32","shape":[1]}}',
                                         b""),
    "unknown dtype": _hand_built(
        b'{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', bytes(8)),
    "negative dim": _hand_built(
        b'{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', bytes(4)),
    "offsets past the data": _hand_built(_F32, bytes(4)),
    "gap before a tensor": _hand_built(
        b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
    "trailing bytes": _hand_built(_F32, bytes(12)),
    "shape [0, 2**62]": _hand_built(
        b'{"x":{"dtype":"F32","shape":[0,4611686018427387904],'
        b'"data_offsets":[0,0]}}', b""),
    "nested 100000 deep": _hand_built(
        b'{"__metadata__":' + b"[" * 100000 + b"]" * 100000 + b"}", b""),
}


def _outcome(load, data: bytes) -> str:
  try:
    load(data)
  except Exception as e:
    # A measurement of what each reader raises, not error handling.
    return f"{type(e).__name__}: {str(e)[:120]}"
  return "loaded without an error"


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main(reps: int = 3, gib: float = 1.0) -> dict:
  rng = np.random.default_rng(0)
  n = 16
  per = int(gib * 2**30) // n // 4
  tensors = {f"layer{i}.lora_A.weight": rng.standard_normal(per, np.float32)
             for i in range(n)}
  tmp = tempfile.mkdtemp()
  f_ours, f_theirs = os.path.join(tmp, "ours.st"), os.path.join(tmp, "theirs.st")
  runs = {k: [] for k in ("ours write", "package write", "ours read",
                          "package read")}
  for rep in range(reps):
    steps = [("ours write", lambda: ours.save_file(f_ours, tensors)),
             ("package write", lambda: stnp.save_file(tensors, f_theirs)),
             ("ours read", lambda: ours.load_file(f_ours)),
             ("package read", lambda: stnp.load_file(f_theirs))]
    for name, fn in (steps if rep % 2 == 0 else steps[::-1]):
      runs[name].append(_time(fn))
  same = open(f_ours, "rb").read() == open(f_theirs, "rb").read()
  for f in (f_ours, f_theirs):
    os.remove(f)
  pkg = os.path.dirname(safetensors.__file__)
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(pkg) for f in fs)
  robustness = {case: {"ours": _outcome(lambda d: ours.from_bytes(d, "f"), data),
                       "package": _outcome(stnp.load, data)}
                for case, data in MALFORMED.items()}
  report = {
      "file_bytes": n * per * 4, "reps": reps,
      "seconds": {k: statistics.median(v) for k, v in runs.items()},
      "all_seconds": runs, "identical_files": same,
      "package_version": safetensors.__version__,
      "package_installed_bytes": size, "robustness": robustness,
      "python": sys.version.split()[0]}
  rows = ["| | lora_jax (numpy) | safetensors package |", "|---|---|---|"]
  s = report["seconds"]
  rows.append(f"| write {report['file_bytes'] / 2**30:.2f} GiB (s, median of "
              f"{reps}) | {s['ours write']:.2f} | {s['package write']:.2f} |")
  rows.append(f"| read (s) | {s['ours read']:.2f} | {s['package read']:.2f} |")
  rows.append(f"| installed size | 0 (213 lines in lora_jax) | "
              f"{size / 2**20:.1f} MiB (safetensors {safetensors.__version__})"
              f" |")
  rows += ["", "| malformed file | lora_jax | package |", "|---|---|---|"]
  rows += [f"| {c} | {r['ours']} | {r['package']} |".replace("\n", " ")
           for c, r in robustness.items()]
  md = ("# safetensors_io\n\n`python benchmarks/safetensors_io.py`: the same "
        f"tensors written by both; files byte-identical: {same}.\n\n"
        + "\n".join(rows) + "\n")
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "safetensors_io.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(RESULTS, "safetensors_io.md"), "w") as f:
    f.write(md)
  print(md)
  return report


if __name__ == "__main__":
  main()
