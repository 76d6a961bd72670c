"""The kinds of PEFT module an adapter is saved as, their keys, and how their
tensors map to lora_jax's factors.

Every kind is converted to and from one common form, PEFT's Linear view of
a (stacked) kernel in its :class:`lora_jax.Layout`: ``lora_A`` ``(G, r, K)``
and ``lora_B`` ``(G, N, r)`` with ``delta W[g]^T = B[g] @ A[g]`` over the
``G`` batch entries, ``K`` inputs and ``N`` outputs
(:meth:`lora_jax.Layout.factors_to_out_in`).

- ``linear``: PEFT's ``lora.Linear`` (and the per-entry modules of a stacked
  kernel): ``<m>.lora_A.weight`` ``(r, K)``, ``<m>.lora_B.weight`` ``(N, r)``,
  DoRA's ``<m>.lora_magnitude_vector`` ``(N,)``. The common form itself.
- ``embedding``: PEFT's ``lora.Embedding`` on a ``(vocab, dim)`` table
  looked up by row: ``<m>.lora_embedding_A`` ``(r, vocab)`` and
  ``<m>.lora_embedding_B`` ``(dim, r)``, no ``.weight``; the delta of the
  table is ``(B @ A)^T``, so ``a = A.T`` and ``b = B.T``: the common form of
  a table whose inputs are its rows, with other key names.
- ``head``: an output head tied to an adapted embedding (``x @ table.T``),
  as PEFT's ``ensure_weight_tying`` gives it: a Linear module with
  ``lora_A = lora_embedding_B.T`` and ``lora_B = lora_embedding_A.T``, the
  same delta of the one table.
- ``param``: PEFT's ``target_parameters`` (``lora.ParamWrapper``) on a
  stacked parameter ``W (E, d1, d2)`` of the module ``<m>``, one rank-``r``
  adapter per expert: ``lora_A.weight`` ``(r*E, N)`` expert-major (row
  ``e*r+k``) on the output side and ``lora_B.weight`` ``(K, r*E)``
  rank-major (column ``k*E+e``) on the input side. Two targeted parameters
  of one module nest one wrapper each, the first registered innermost: the
  ``j``-th of ``n`` saves under ``<m>`` + ``.base_layer`` * ``(n-1-j)``.

Trainable tokens (:class:`lora_jax.TrainableTokens`) are their rows' new
values ``(n, dim)`` as they are: ``<m>.token_adapter.trainable_tokens_delta``
in a LoRA adapter (``trainable_token_indices={module: ids}``),
``<m>.trainable_tokens_delta`` with ``peft_type TRAINABLE_TOKENS``
(``token_indices``). PEFT ties them to a tied head itself.
"""

from __future__ import annotations

import numpy as np

from lora_jax._src.peft.files import LORA_A
from lora_jax._src.peft.files import LORA_B
from lora_jax._src.peft.files import MAGNITUDE

LINEAR, EMBEDDING, PARAM, HEAD = "linear", "embedding", "param", "head"
BASE_LAYER = ".base_layer"
# The base weights PEFT saves beside an adapted embedding (and its tied head).
BASE_WEIGHT = BASE_LAYER + ".weight"
# (lora_A, lora_B) key suffixes of each kind.
SUFFIXES = {LINEAR: (LORA_A, LORA_B),
            EMBEDDING: (".lora_embedding_A", ".lora_embedding_B"),
            PARAM: (LORA_A, LORA_B),
            HEAD: (LORA_A, LORA_B)}
# Trainable tokens' new rows (n, dim): in a LoRA adapter
# (trainable_token_indices) and in a TrainableTokensConfig adapter.
TOKENS_IN_LORA = ".token_adapter.trainable_tokens_delta"
TOKENS = ".trainable_tokens_delta"
# The modules PEFT's ensure_weight_tying ties (EMBEDDING_LAYER_NAMES).
TIED_BY_PEFT = ("embed_tokens", "lm_head")


def nested_module(module: str, j: int, n: int) -> str:
  """The key prefix of the ``j``-th of ``n`` targeted parameters of
  ``module`` (the first registered is wrapped innermost).

  >>> nested_module("mlp.experts", 0, 2), nested_module("mlp.experts", 1, 2)
  ('mlp.experts.base_layer', 'mlp.experts')
  """
  return module + BASE_LAYER * (n - 1 - j)


def param_to_peft(lora_a: np.ndarray, lora_b: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """ParamWrapper's ``(lora_A (r*E, N), lora_B (K, r*E))`` from the common
  form ``(E, r, K)``, ``(E, N, r)``.

  >>> A, B = param_to_peft(np.zeros((3, 2, 5)), np.zeros((3, 7, 2)))
  >>> A.shape, B.shape
  ((6, 7), (5, 6))
  """
  e, r, k = lora_a.shape
  return (np.ascontiguousarray(np.swapaxes(lora_b, 1, 2)).reshape(e * r, -1),
          np.ascontiguousarray(np.transpose(lora_a, (2, 1, 0))).reshape(
              k, r * e))


def param_from_peft(peft_a: np.ndarray, peft_b: np.ndarray, experts: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of :func:`param_to_peft`: the common form ``(E, r, K)``,
  ``(E, N, r)`` of ParamWrapper's ``lora_A`` ``(r*E, N)`` and ``lora_B``
  ``(K, r*E)``.

  >>> a = np.arange(30.).reshape(3, 2, 5); b = np.arange(42.).reshape(3, 7, 2)
  >>> [np.array_equal(x, y) for x, y in zip(param_from_peft(
  ...     *param_to_peft(a, b), 3), (a, b))]
  [True, True]
  """
  r = peft_a.shape[0] // experts
  lora_a = np.transpose(peft_b.reshape(peft_b.shape[0], r, experts), (2, 1, 0))
  lora_b = np.swapaxes(peft_a.reshape(experts, r, peft_a.shape[1]), 1, 2)
  return lora_a, lora_b


def module_of_key(key: str, prefix: str) -> str | None:
  """The torch module a key of PEFT's file belongs to (a targeted
  parameter's wrappers and a base weight's ``.base_layer`` removed), or
  None for a key of no module.

  >>> module_of_key("base_model.model.m.experts.base_layer.lora_A.weight",
  ...               "base_model.model.")
  'm.experts'
  """
  if not key.startswith(prefix):
    return None
  ends = sorted({*SUFFIXES[LINEAR], *SUFFIXES[EMBEDDING], TOKENS_IN_LORA,
                 TOKENS, BASE_WEIGHT, MAGNITUDE}, key=len, reverse=True)
  end = next((e for e in ends if key.endswith(e)), None)
  if end is None:
    return None
  return key[len(prefix):-len(end)].replace(BASE_LAYER, "")
