"""Fixed points of the program analyses, iterated until nothing changes.

Each analysis that loops (taint through a scan carry, row axes through a
carry, a recompute region shrinking until nothing leaks) moves its state up a
finite lattice, so it reaches its fixed point within the lattice's height.
The caller passes that height, computed from the program's size; running past
it means the step is not monotone, a bug in lora_jax, and is an error, never
a partial answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class FixedPointError(RuntimeError):
  """An analysis did not converge within its lattice's height (a bug)."""


def iterate(step: Callable[[T], T], state: T, height: int, what: str) -> T:
  """Applies ``step`` until the state stops changing.

  Args:
    step: the state after one more round; monotone in the analysis' lattice.
    state: the starting state.
    height: how often the state can still change (the lattice's height above
      ``state``); the fixed point is reached within ``height + 1`` rounds.
    what: what is being analysed, for the error.

  Returns:
    The fixed point.

  Raises:
    FixedPointError: the state changed more than ``height`` times.
  """
  for _ in range(height + 1):
    new = step(state)
    if new == state:
      return state
    state = new
  raise FixedPointError(
      f"lora_jax: {what} changed more than {height} times, the most its "
      f"lattice allows. This is a bug in lora_jax; please report it with the "
      f"program that triggers it.")
