"""nnx_bridge: a Flax NNX module whose LoRA factors are ``nnx.LoRAParam``.

:func:`apply_lora` turns an NNX model into a module that libraries built on
NNX (tunix's ``PeftTrainer`` and ``Sampler``, ``nnx.Optimizer(wrt=
nnx.LoRAParam)``) train and run as they are, while every call goes through
:func:`lora_jax.wrap` of a pure function of the model's state, so it computes
what the model with weights ``lora_jax.merge(base, delta)`` computes, in the
engine chosen (factored by default).

Layout of the module (``LoraModule``):

* ``base_model``: a copy of the input model (its ``nnx.Param`` leaves hold the
  frozen base: the input's arrays, or a principal init's residual; any other
  state, such as caches, RNG counters and batch statistics, is its own copy).
* ``lora``: a tree of small modules mirroring the adapted kernels' paths, each
  holding ``a`` and ``b`` (and ``magnitude`` with DoRA) as ``nnx.LoRAParam``.
* static metadata: each adapter's path, scale, layout, dropout and init mark,
  the engine, and the wrapped class's ``__call__`` signature.

Attribute order: NNX orders a module's attributes by name, so
``nnx.variables(m)``'s first leaf is ``base_model``'s first leaf (the input
model's own first leaf), never a float32 factor of a bf16 model.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import inspect
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import describe_array
from lora_jax._src.delta import is_concrete
from lora_jax._src.jaxpr_core import is_array
from lora_jax._src.merge import merge as merge_trees
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.quant import dequantize
from lora_jax._src.sharding import factor_specs
from lora_jax._src.split import split
from lora_jax._src.wrap import MODES
from lora_jax._src.wrap import wrap

_FACTORS = ("a", "b", "magnitude")
_DROPOUT_STREAM = 0x10AD  # folded into apply_lora's key for LoRA dropout


# flax >= 0.12 deprecates ``Variable.value``; 0.11 has only ``value``.
def _get(var: Any) -> Any:
  return var.get_value() if hasattr(var, "get_value") else var.value


def _set(var: Any, value: Any) -> None:
  if hasattr(var, "set_value"):
    var.set_value(value)
  else:
    var.value = value


def _fresh(tree: Any) -> Any:
  """``tree`` with new Variable objects: flax 0.12's ``nnx.merge`` of a split
  state shares the Variables' storage with the split module, so a module
  merged from it would write into the other one's state."""
  return jax.tree.map(lambda x: x, tree)


def _split(model: nnx.Module):
  """``(graphdef, params, rest)``: the frozen ``nnx.Param`` leaves (never a
  LoRAParam here) and every other state (caches, RNG, batch statistics)."""
  return nnx.split(model, nnx.Param, ...)


class _Node(nnx.Module):
  """A level of the adapter tree: one attribute per path segment."""


class _Adapter(nnx.Module):
  """One kernel's factors, trainable: ``a``, ``b`` (and DoRA's
  ``magnitude``) as ``nnx.LoRAParam``, each with the Variable metadata
  ``metadata[name]`` where given (:func:`_factor_metadata`)."""

  def __init__(self, d: LoraDelta, metadata: dict | None = None):
    for name in _FACTORS:
      value = getattr(d, name)
      if value is not None:
        setattr(self, name, _lora_param(value, (metadata or {}).get(name)))


# The Variable metadata saying how a kernel is sharded (the axis names
# ``nnx.get_partition_spec`` reads): flax 0.12 stores ``sharding=`` under
# ``out_sharding``, flax 0.11 under ``sharding``.
_SHARDING_KEYS = ("out_sharding", "sharding")
# What else a factor takes from its kernel's metadata as it is: the rules
# that map logical axis names to the mesh's (flax 0.12) and the mesh.
_SHARDING_CONTEXT = ("sharding_rules", "mesh")


def _lora_param(value: Any, metadata: dict | None) -> nnx.LoRAParam:
  """``nnx.LoRAParam(value)`` with ``metadata``.

  ``value`` is already placed like its kernel (:func:`split`), so the
  metadata only tells trainers how the factor is sharded. On flax 0.12 it
  is set after construction, with ``eager_sharding=False``: an eagerly
  sharded Variable wants a mesh in context whenever flax makes one like it,
  and ``nnx.Optimizer`` makes its state like the parameters, so without
  this an optimizer built outside ``jax.set_mesh`` would fail where it
  works for factors without metadata."""
  var = nnx.LoRAParam(value)
  if not metadata:
    return var
  if hasattr(var, "set_metadata"):  # flax >= 0.12
    extra = ({"eager_sharding": False}
             if "eager_sharding" in var.get_metadata() else {})
    var.set_metadata(**metadata, **extra)
    return var
  return nnx.LoRAParam(value, **metadata)


def _factor_metadata(params: Any, deltas: dict[str, LoraDelta]) -> dict:
  """``{kernel path: {factor name: metadata}}`` for the adapted kernels
  whose ``nnx.Param`` carries sharding metadata: ``a`` takes the kernel's
  axis names on its batch and input axes, ``b`` on its batch and output
  axes, DoRA's magnitude on its batch and output axes, the rank axis none
  (:func:`lora_jax.factor_specs`, as for the arrays), and each the
  kernel's sharding rules and mesh. Trainers that shard by metadata
  (tunix's ``PeftTrainer``: ``nnx.get_partition_spec`` of the optimizer
  state) then shard the factors and their optimizer state as the factors
  are, instead of replicating them."""
  out: dict = {}
  for keys, var in nnx.to_flat_state(params):
    path = "/".join(str(k) for k in keys)
    d = deltas.get(path)
    if d is None:
      continue
    meta = var.get_metadata()
    key = next((k for k in _SHARDING_KEYS if meta.get(k)), None)
    if key is None:
      continue
    given = meta[key]
    context = {k: meta[k] for k in _SHARDING_CONTEXT if meta.get(k)}
    # flax 0.12 also takes a NamedSharding (its mesh in place of one in
    # context): the factors get its spec's names and its mesh as ``mesh``
    # (names, which nnx.get_partition_spec reads where it cannot read a
    # NamedSharding: the optimizer state of the factors alone)
    if isinstance(given, jax.sharding.NamedSharding):
      context.setdefault("mesh", given.mesh)
      given = given.spec
    elif not isinstance(given, (tuple, list, PartitionSpec)):
      raise ValueError(
          f"lora_jax.nnx.apply_lora: the kernel {path!r} has sharding "
          f"metadata {key}={given!r}; expected a tuple of axis names (or "
          f"None per axis), a PartitionSpec or a NamedSharding.")
    names = tuple(given)
    if len(names) > d.layout.ndim:
      raise ValueError(
          f"lora_jax.nnx.apply_lora: the kernel {path!r} has sharding "
          f"metadata {key}={names}, {len(names)} names for its "
          f"{d.layout.ndim} axes. Give the nnx.Param one name (or None) per "
          f"axis.")
    specs = factor_specs(PartitionSpec(*names), d.layout)
    out[path] = {name: {key: tuple(spec), **context}
                 for name, spec in zip(_FACTORS, specs)}
  return out


class LoraModule(nnx.Module):
  """An NNX model with LoRA adapters (see :func:`lora_jax.nnx.apply_lora`).

  Calls and methods of the wrapped model run through :func:`lora_jax.wrap`;
  other attributes of the wrapped model (``config``, ...) read through.
  Build one with :func:`lora_jax.nnx.apply_lora`, not directly.

  Attributes:
    base_model: a copy of the model: its weights (``nnx.Param``) frozen, its
      other state (caches, RNG counters, batch statistics) updated by calls.
    lora: the adapters, ``lora/<kernel path>/{a, b[, magnitude]}``, the
      module's only ``nnx.LoRAParam`` variables.

  >>> import jax, lora_jax as lj, lora_jax.nnx as ljn
  >>> from flax import nnx
  >>> m = ljn.apply_lora(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
  ...                    lj.LoraConfig(rank=2), jax.random.key(1))
  >>> isinstance(m, ljn.LoraModule), type(m.base_model).__name__
  (True, 'Linear')
  >>> [p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam))]
  [('lora', 'kernel', 'a'), ('lora', 'kernel', 'b')]
  """

  def __init__(self, base_model: nnx.Module, lora: _Node,
               specs: tuple, mode: str, dropout_key: jax.Array | None = None):
    self.base_model = base_model
    self.lora = lora
    self.lora_specs = specs
    # the factors' shapes and dtypes: what nnx.update may not change
    self.lora_shapes = tuple(
        (path, name, tuple(np.shape(_get(var))), str(_get(var).dtype))
        for path, *_ in specs for name in _FACTORS
        if (var := getattr(_node_at(lora, path), name, None)) is not None)
    self.lora_mode = mode
    if dropout_key is not None:
      # LoRA dropout: a key per call from this stream while training;
      # ``m.eval()`` / ``m.train()`` set ``deterministic`` as on nnx.Dropout.
      self.lora_rngs = nnx.Rngs(lora_dropout=dropout_key)
      self.deterministic = False

  # -- what the wrapped model offers --------------------------------------

  def __call__(self, *args, **kwargs):
    return self._lora_call("__call__", args, kwargs)

  def __getattr__(self, name: str):
    # Only called when ordinary lookup fails: the wrapped model's attributes.
    # Private names stay private (NNX and Python probe some of them).
    if name.startswith("_"):
      raise AttributeError(name)
    inner = vars(self).get("base_model")
    if inner is None:
      raise AttributeError(name)
    value = getattr(inner, name)
    if inspect.ismethod(value) and value.__self__ is inner:
      @functools.wraps(value)
      def method(*args, **kwargs):
        return self._lora_call(name, args, kwargs)
      return method
    return value

  def __setattr__(self, name: str, value: Any) -> None:
    # An attribute of the wrapped model (``m.decode = True`` on flax's
    # MultiHeadAttention) is set there: on ``m`` it would only shadow it,
    # and the model's calls would not see it. (NNX rebuilds modules
    # without calling __setattr__.)
    inner = vars(self).get("base_model")
    if (inner is not None and name not in _OWN and name not in vars(self)
        and not name.startswith("_") and hasattr(inner, name)):
      setattr(inner, name, value)
      return
    super().__setattr__(name, value)

  def __dir__(self):
    return sorted(set(super().__dir__()) | set(dir(self.base_model)))

  # -- the LoRA path -------------------------------------------------------

  def _lora_call(self, name: str, args: tuple, kwargs: dict):
    _refuse_nnx_arguments(name, args, kwargs)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = tuple(x if is_array(x) else None for x in leaves)
    static = tuple(_ARRAY if is_array(x) else x for x in leaves)
    if _eager(self, dynamic) and _hashable((static, treedef)):
      # compiled once per structure, instead of the engine's ops one by one
      return _compiled_call(self, name, dynamic, static, treedef)
    return self._lora_apply(name, dynamic, static, treedef)

  def _lora_apply(self, name: str, dynamic: tuple, static: tuple, treedef):
    lora_rng = None
    if "lora_rngs" in vars(self) and not self.deterministic:
      lora_rng = self.lora_rngs.lora_dropout()
    graphdef, params, rest = _split(self.base_model)
    after: list = []  # the model's graphdef after the call
    out, new_rest = _run(graphdef, name, self.lora_mode, params,
                         self.lora_deltas(), rest, dynamic, static, treedef,
                         lora_rng, after)
    if after and after[-1] != graphdef:
      # the method added state (flax's MultiHeadAttention.init_cache adds
      # its cache Variables): add the same attributes here first
      _graft(self.base_model, nnx.merge(after[-1], *_fresh((params,
                                                            new_rest))))
      if nnx.graphdef(self.base_model) != after[-1]:
        raise ValueError(
            f"lora_jax.nnx: m.{name}(...) changed the model's structure "
            f"in a way the adapted module cannot copy (a static attribute, "
            f"a removed or retyped Variable). Make that change on the "
            f"model before apply_lora, or return the new values instead.")
    nnx.update(self.base_model, new_rest)
    return out

  def lora_deltas(self) -> dict[str, LoraDelta]:
    """``{path: LoraDelta}`` from the current factors (tracers under a
    transform)."""
    for path, name, shape, dtype in self.lora_shapes:
      value = _get(getattr(_node_at(self.lora, path), name))
      if tuple(value.shape) != shape or str(value.dtype) != dtype:
        raise ValueError(
            f"lora_jax.nnx: the factor {path}/{name} is "
            f"{describe_array(value)}, but this module's adapter was made "
            f"{describe_array(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))}"
            f" (its scale is for that rank). Factors "
            f"were replaced by ones of another shape or dtype (nnx.update "
            f"with another model's or a checkpoint's state?). Load deltas "
            f"with lora_jax.nnx.set_delta, or apply_lora with the config "
            f"they were trained with.")
    out = {}
    for path, scale, layout, dropout, residual_of in self.lora_specs:
      node = _node_at(self.lora, path)
      magnitude = getattr(node, "magnitude", None)
      out[path] = LoraDelta(
          _get(node.a), _get(node.b), scale=scale, layout=layout,
          magnitude=None if magnitude is None else _get(magnitude),
          dropout=dropout, residual_of=residual_of)
    return out


# LoraModule's own attributes, never forwarded to the wrapped model
_OWN = frozenset({"base_model", "lora", "lora_specs", "lora_shapes",
                  "lora_mode", "lora_rngs", "deterministic"})


class _Array:
  """Marks where an array argument goes among the static ones."""

  def __repr__(self) -> str:
    return "<array>"


_ARRAY = _Array()


def _graft(target: Any, source: Any) -> None:
  """Adds to ``target``'s graph the attributes that ``source`` (the same
  model after a call) has and ``target`` lacks, at the same paths."""
  for path, node in nnx.iter_graph(source):
    if not isinstance(node, nnx.Module):
      continue
    here = target
    for key in path:
      here = getattr(here, key) if isinstance(key, str) else here[key]
    for attr, value in vars(node).items():
      if attr.startswith(("_object__", "_pytree__")):  # NNX's own
        continue
      old = vars(here).get(attr)
      if isinstance(value, _NNX_OBJECTS) and not isinstance(old,
                                                            _NNX_OBJECTS):
        setattr(here, attr, value)  # e.g. None -> nnx.Cache


def _run(graphdef, name: str, mode: str, params, deltas, rest, dynamic,
         static, treedef, lora_rng=None, after: list | None = None):
  """``(out, new non-Param state)`` of ``name`` on the model ``graphdef``
  with weights ``merge(params, deltas)``, through :func:`lora_jax.wrap`."""
  leaves = [d if s is _ARRAY else s for d, s in zip(dynamic, static)]
  args, kwargs = jax.tree.unflatten(treedef, leaves)

  def fn(p, state, call_args, call_kwargs):
    model = nnx.merge(graphdef, *_fresh((p, state)))
    out = getattr(model, name)(*call_args, **call_kwargs)
    if after is not None:
      after.append(nnx.graphdef(model))
    return out, nnx.state(model, nnx.Not(nnx.Param))
  # the call's arguments travel as two positional values: a keyword the
  # model takes (adapter_ids, lora_rng, ...) is never read by wrap itself
  return wrap(fn, mode)(params, deltas, rest, args, kwargs, lora_rng=lora_rng)


# NNX objects (modules, ``nnx.Rngs``, Variables): flax >= 0.12 derives them
# from ``nnx.Pytree``, flax 0.11 from ``nnx.Object``.
_NNX_OBJECTS = (nnx.Variable, getattr(nnx, "Pytree", None) or nnx.Object)


def _refuse_nnx_arguments(name: str, args: tuple, kwargs: dict) -> None:
  """An error naming any argument that is an NNX object: the call would see
  a copy of its state, and what the model changes in it (an ``nnx.Rngs``
  counter, a cache Variable) would be lost, so the next call would draw the
  same dropout mask."""
  found, _ = jax.tree_util.tree_flatten_with_path(
      (args, kwargs), is_leaf=lambda x: isinstance(x, _NNX_OBJECTS))
  nodes = [f"{'args' if path[0].idx == 0 else 'kwargs'}"  # type: ignore[attr-defined]
           f"{jax.tree_util.keystr(path[1:])} ({type(x).__name__})"
           for path, x in found if isinstance(x, _NNX_OBJECTS)]
  if nodes:
    raise TypeError(
        f"lora_jax.nnx: m.{name}(...) was given NNX objects as arguments: "
        f"{preview(nodes)}. The adapted call takes arrays (and static "
        f"Python values); the state the model would update in such an "
        f"object (an nnx.Rngs counter, a Variable) would not come back. "
        f"Keep it on the model (e.g. nnx.Dropout(..., rngs=rngs) at "
        f"construction), or pass arrays (a key: rngs.dropout(); a "
        f"Variable's value: v[...]) and return what changes.")


def _eager(m: nnx.Module, dynamic: tuple) -> bool:
  """No value is a tracer: the call is not under a transform."""
  return not any(isinstance(x, jax.core.Tracer)
                 for x in jax.tree.leaves((nnx.state(m), dynamic)))


def _hashable(x: Any) -> bool:
  try:
    hash(x)
  except TypeError:
    return False
  return True


def _apply(m, name, dynamic, static, treedef):
  return m._lora_apply(name, dynamic, static, treedef)


_compiled_call: Callable[..., Any] = nnx.jit(_apply, static_argnums=(1, 3, 4))


def _adapters_only(delta: Any, who: str) -> dict[str, LoraDelta]:
  """``{path: LoraDelta}``, or an error naming any other entry of the delta
  (a ``TrainableTokens`` row set, a stack) that the module cannot hold."""
  others = [p for p, x in leaves_with_paths(
      delta, is_leaf=lambda x: x is None or isinstance(x, LoraDelta))
            if x is not None and not isinstance(x, LoraDelta)]
  if others:
    raise ValueError(
        f"lora_jax.nnx.{who}: the delta holds entries other than LoRA "
        f"adapters at {preview(others)} (trainable token rows, a stack of "
        f"adapters ...), which lora_jax.nnx modules do not hold yet. Use "
        f"the functional API (lj.split / lj.wrap) for them.")
  return adapters(delta)


def _segments(path: str) -> list[str]:
  return path.split("/")


def _node_at(root: _Node, path: str) -> Any:
  node = root
  for seg in _segments(path):
    node = getattr(node, seg)
  return node


def _adapter_tree(deltas: dict[str, LoraDelta], metadata: dict) -> _Node:
  root = _Node()
  reserved = set(dir(_Node)) | set(dir(_Adapter))
  for path, d in deltas.items():
    segs = _segments(path)
    clash = [s for s in segs if s in reserved or s.startswith("__")]
    if clash:
      raise ValueError(
          f"lora_jax.nnx.apply_lora: the adapted kernel {path!r} has a path "
          f"segment {clash[0]!r} that is also an attribute name of nnx.Module, "
          f"so its adapter cannot be stored under that name. Exclude it from "
          f"the LoraConfig or rename that attribute of the model.")
    node = root
    for seg in segs[:-1]:
      child = vars(node).get(seg)
      if child is None:
        child = _Node()
        setattr(node, seg, child)
      node = child
    setattr(node, segs[-1], _Adapter(d, metadata.get(path)))
  return root


@functools.cache
def _class_for(cls: type) -> type:
  """A subclass of LoraModule whose ``__call__`` reports ``cls.__call__``'s
  parameters (tunix passes ``decode_only_last_token`` only to models whose
  signature names it). One per wrapped class, so graphdefs compare equal."""
  call = vars(cls).get("__call__") or next(
      (vars(k)["__call__"] for k in cls.__mro__ if "__call__" in vars(k)),
      None)
  if call is None:
    return LoraModule
  try:
    sig = inspect.signature(call)
  except (TypeError, ValueError):  # a builtin without one
    return LoraModule

  def __call__(self, *args, **kwargs):
    return self._lora_call("__call__", args, kwargs)
  __call__.__signature__ = sig  # type: ignore[attr-defined]
  __call__.__doc__ = getattr(call, "__doc__", None)
  return type(f"Lora{cls.__name__}", (LoraModule,),
              {"__call__": __call__, "__module__": __name__,
               "__qualname__": f"Lora{cls.__name__}"})


def apply_lora(model: nnx.Module, config: LoraConfig, key: jax.Array,
               *example_args: Any, mode: str = "auto",
               **example_kwargs: Any) -> nnx.Module:
  """An NNX module: ``model`` with LoRA adapters as ``nnx.LoRAParam``.

  ``model`` is left unchanged. The result ``m`` computes what ``model`` with
  weights ``lora_jax.merge(base, delta)`` computes (``base`` its frozen
  ``nnx.Param`` leaves, ``delta`` the adapters, :func:`get_delta`), for
  ``m(...)`` and for every method of ``model`` called on ``m`` (``m.init_cache
  (...)``, a decode step with a KV cache ...), through :func:`lora_jax.wrap`
  in ``mode`` (factored by default). State the call changes (caches, RNG
  counters, batch statistics) is written back into ``m`` as the model would
  write it into itself. Other attributes of ``model`` (``m.config``) read
  through.

  Contract (what libraries on NNX may rely on):

  * The only ``nnx.LoRAParam`` leaves of ``m`` are the factors: ``a``
    ``(*batch, *in, r)``, ``b`` ``(r, *out)``-shaped as in
    :class:`lora_jax.LoraDelta`, and ``magnitude`` with DoRA, at
    ``m.lora.<kernel path>.{a,b,magnitude}``. ``nnx.Optimizer(m, tx,
    wrt=nnx.LoRAParam)`` and ``nnx.grad(..., argnums=nnx.DiffState(0,
    nnx.LoRAParam))`` train exactly them; their gradients are
    ``lora_jax.wrap``'s for the same factors.
  * The frozen weights stay ``nnx.Param`` (not trained under
    ``wrt=nnx.LoRAParam``) in ``m.base_model``, a copy of ``model`` that
    shares its (immutable) weight arrays; other state is copied.
  * Calls add no attribute to ``m`` (safe under ``nnx.jit`` /
    ``nnx.cached_partial``), except the Variables a method of ``model``
    adds to itself (``nnx.MultiHeadAttention.init_cache``'s caches), which
    ``m.base_model`` gains as ``model`` would; a method that changes a
    static attribute is an error. Arguments are arrays or static values,
    not NNX objects (an ``nnx.Rngs`` argument is an error: keep it on the
    model). ``m.__call__``'s signature is ``model``'s.
  * ``nnx.variables(m)``'s first leaf is ``model``'s first leaf.
  * Factors are float32 for bf16 kernels unless ``config.dtype`` says
    otherwise (as :func:`lora_jax.split`).
  * A kernel whose ``nnx.Param`` has sharding metadata (``sharding=`` at
    construction: ``out_sharding`` on flax 0.12, ``sharding`` on 0.11)
    gives its factors the names :func:`lora_jax.factor_specs` gives their
    arrays: ``a`` the kernel's batch and input axes' names, ``b`` its batch
    and output axes', the rank axis None. ``nnx.get_partition_spec`` of the
    factors and of their optimizer state then says how they are sharded.

  A QLoRA base: give ``model`` :class:`lora_jax.QArray` weights first, e.g.
  ``graph, state = nnx.split(model); qmodel = nnx.merge(graph,
  lj.quantize(state, "nf4", targets="all-linear", apply_fn=lambda s, *a:
  nnx.merge(graph, s)(*a), example_args=example_args))``, then
  ``apply_lora(qmodel, ...)``; the kernels are dequantized at their point of
  use (``qmodel`` itself cannot be called).

  The LoRA path starts at ``m``: ``m(...)`` and ``m.<method>(...)`` are
  adapted, but a submodule reached through ``m`` (``m.layers[0]``, or
  ``m.base_model`` itself) is the frozen base and computes without the
  adapters.

  Methods run through ``lora_jax.wrap`` as under ``jax.jit``: array
  arguments are traced, other arguments (Python numbers, strings, dtypes)
  are static, and the results must be arrays (or pytrees of them). A call
  with no tracer in sight is compiled (``nnx.jit``) once per structure of
  its arguments. The trainable token rows of
  ``LoraConfig(trainable_tokens=...)`` are not supported here yet (an error
  says so); the functional API has them.

  LoRA dropout (``LoraConfig(dropout=p)``): ``m`` holds an ``nnx.Rngs``
  (``m.lora_rngs``, seeded from ``key``) and a ``deterministic`` flag that
  ``m.train()`` / ``m.eval()`` set as they do on ``nnx.Dropout``. While
  training, each call draws one key from the stream and computes
  ``lora_jax.wrap(f)(base, delta, ..., lora_rng=key)``; in eval mode no
  dropout is applied.

  Args:
    model: a Flax NNX module (not one from ``apply_lora``; no
      ``nnx.LoRAParam`` of its own).
    config: which ``nnx.Param`` leaves to adapt, and how
      (:class:`lora_jax.LoraConfig`; paths as in ``nnx.state(model)``, e.g.
      ``"layers/0/attn/q_proj/kernel"``).
    key: PRNG key for the factors' init.
    *example_args: example arguments of ``model(...)``; with them the layout
      of every adapted kernel (and ``targets="all-linear"``) is read off an
      abstract trace of the call, as :func:`lora_jax.split` does. Needed for
      N-D kernels (einsums, ``nnx.scan`` stacks).
    mode: the engine, as in :func:`lora_jax.wrap`: ``"auto"``,
      ``"factored"`` or ``"merge"``.
    **example_kwargs: example keyword arguments of ``model(...)``.

  Returns:
    The adapted module (a ``LoraModule``), of a class named
    ``Lora<ModelClass>``.

  Raises:
    TypeError: ``model`` is not an NNX module, or ``config`` not a LoraConfig.
    ValueError: ``model`` already has ``nnx.LoRAParam`` leaves or is adapted,
      ``config`` selects no leaf, ``mode`` is unknown, or LoRA dropout is
      asked for with ``mode="merge"``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, lora_jax.nnx as ljn
  >>> from flax import nnx
  >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> m = ljn.apply_lora(model, lj.LoraConfig(rank=2), jax.random.key(1))
  >>> sorted(p for p, _ in lj.leaves_with_paths(nnx.state(m, nnx.LoRAParam)))
  ['lora/kernel/a', 'lora/kernel/b']
  >>> bool(jnp.allclose(m(jnp.ones((2, 4))), model(jnp.ones((2, 4)))))
  True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"lora_jax.nnx.apply_lora expects a flax.nnx.Module, got "
                    f"{type(model).__name__}.")
  if isinstance(model, LoraModule):
    raise ValueError(
        "lora_jax.nnx.apply_lora: this model already has adapters (it came "
        "from apply_lora). Adapt the original model, or fold these in first: "
        "lora_jax.nnx.merge(m).")
  if not isinstance(config, LoraConfig):
    raise TypeError(f"lora_jax.nnx.apply_lora expects a lora_jax.LoraConfig, "
                    f"got {config!r}.")
  if mode not in MODES:
    raise ValueError(f"lora_jax.nnx.apply_lora: mode must be one of {MODES}, "
                     f"got {mode!r}.")
  own = [p for p, _ in leaves_with_paths(nnx.state(model, nnx.LoRAParam))]
  if own:
    raise ValueError(
        f"lora_jax.nnx.apply_lora: the model already has nnx.LoRAParam leaves "
        f"({preview(own)}), e.g. from nnx.LoRA layers; trainers would train "
        f"them along with lora_jax's factors. Build the model without them.")
  if config.dropout and mode == "merge":
    raise ValueError(
        "lora_jax.nnx.apply_lora: LoRA dropout acts on the LoRA branch's "
        "input, which mode='merge' does not have; use mode='auto' or "
        "'factored', or LoraConfig(dropout=0.0).")
  graphdef, params, rest = _split(model)
  apply_fn: Callable | None = None
  if example_args or example_kwargs:
    def apply_fn(p, *a, **k):
      return nnx.merge(graphdef, *_fresh((p, rest)))(*a, **k)
  base, delta = split(params, config, key, apply_fn=apply_fn,
                      example_args=example_args,
                      example_kwargs=example_kwargs)
  deltas = _adapters_only(delta, "apply_lora")
  specs = tuple((p, d.scale, d.layout, d.dropout, d.residual_of)
                for p, d in deltas.items())
  inner = nnx.merge(graphdef, *_fresh((base, rest)))
  dropout_key = None
  if any(d.dropout for d in deltas.values()):
    dropout_key = jax.random.fold_in(key, _DROPOUT_STREAM)
  lora = _adapter_tree(deltas, _factor_metadata(params, deltas))
  return _class_for(type(model))(inner, lora, specs, mode, dropout_key)


def _lora_module(m: Any, who: str) -> LoraModule:
  if not isinstance(m, LoraModule):
    raise TypeError(
        f"lora_jax.nnx.{who} expects a module from lora_jax.nnx.apply_lora, "
        f"got {type(m).__name__}.")
  return m


def get_delta(m: nnx.Module) -> Any:
  """The adapters of ``m`` as a lora_jax delta tree.

  The tree has the structure of ``nnx.state(model, nnx.Param).to_pure_dict()``
  of the wrapped model (a nested dict), with a :class:`lora_jax.LoraDelta` at
  each adapted kernel and ``None`` elsewhere, holding ``m``'s current factors
  (the arrays themselves, no copy). It is what :func:`lora_jax.split` gives,
  for :func:`lora_jax.save`, :func:`lora_jax.save_peft`, :func:`lora_jax.merge`
  (with ``nnx.state(model)`` or its pure dict as the base) and
  :func:`lora_jax.wrap`.

  Args:
    m: a module from :func:`apply_lora`.

  Returns:
    The delta tree.

  Raises:
    TypeError: ``m`` is not from :func:`apply_lora`.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, lora_jax.nnx as ljn
  >>> from flax import nnx
  >>> m = ljn.apply_lora(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
  ...                    lj.LoraConfig(rank=2), jax.random.key(1))
  >>> ljn.get_delta(m)
  {'bias': None, 'kernel': LoraDelta(rank=2, kernel=(4, 3), a=f32[4,2], b=f32[2,3], scale=8)}
  """
  m = _lora_module(m, "get_delta")
  deltas = m.lora_deltas()
  pure = nnx.state(m.base_model, nnx.Param).to_pure_dict()
  return _fill(pure, (), deltas)


def _fill(tree: Any, prefix: tuple, deltas: dict) -> Any:
  if isinstance(tree, dict):
    return {k: _fill(v, (*prefix, str(k)), deltas) for k, v in tree.items()}
  return deltas.get("/".join(prefix))


def set_delta(m: nnx.Module, delta: Any) -> None:
  """Loads the adapters of ``delta`` into ``m``, in place.

  ``delta`` must hold an adapter for every kernel ``m`` adapts and no other,
  each with the same scale, layout and DoRA-ness, and factors of the same
  shapes and dtypes as ``m``'s (a delta from :func:`get_delta`,
  :func:`lora_jax.load` or :func:`lora_jax.split` with the same config). The
  new factors go where ``m``'s are (same devices / sharding).

  Args:
    m: a module from :func:`apply_lora`.
    delta: a lora_jax delta tree (``None`` slots or a plain dict of paths).

  Returns:
    None.

  Raises:
    TypeError: ``m`` is not from :func:`apply_lora`.
    ValueError: naming the leaf, where ``delta`` does not fit ``m``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, lora_jax.nnx as ljn
  >>> from flax import nnx
  >>> m = ljn.apply_lora(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
  ...                    lj.LoraConfig(rank=2), jax.random.key(1))
  >>> d = ljn.get_delta(m)
  >>> d["kernel"] = d["kernel"].replace(b=jnp.ones((2, 3)))
  >>> ljn.set_delta(m, d)
  >>> float(nnx.state(m, nnx.LoRAParam)["lora"]["kernel"]["b"][...].sum())
  6.0
  """
  m = _lora_module(m, "set_delta")
  new = _adapters_only(delta, "set_delta")
  have = {spec[0]: spec for spec in m.lora_specs}
  missing = [p for p in have if p not in new]
  extra = [p for p in new if p not in have]
  if missing or extra:
    raise ValueError(
        f"lora_jax.nnx.set_delta: the delta does not adapt the kernels this "
        f"module adapts: missing {preview(missing)}, not adapted here "
        f"{preview(extra)}. Use a delta made with the same LoraConfig, or "
        f"apply_lora with the config it was trained with.")
  updates = []
  for path, (_, scale, layout, _, _) in have.items():
    d = new[path]
    node = _node_at(m.lora, path)
    if not math.isclose(d.scale, scale) or d.layout != layout:
      raise ValueError(
          f"lora_jax.nnx.set_delta: the adapter at {path!r} has scale "
          f"{d.scale:g} and layout {d.layout}; this module's has scale "
          f"{scale:g} and layout {layout}. apply_lora with the config the "
          f"delta was trained with (rank, alpha, use_rslora).")
    for name in _FACTORS:
      var = getattr(node, name, None)
      value = getattr(d, name)
      if (var is None) != (value is None):
        raise ValueError(
            f"lora_jax.nnx.set_delta: the adapter at {path!r} "
            f"{'has no' if value is None else 'has a'} DoRA {name}, this "
            f"module's {'has one' if var is not None else 'has none'}. Use "
            f"the same LoraConfig(use_dora=...).")
      if var is None:
        continue
      old = _get(var)
      if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ValueError(
            f"lora_jax.nnx.set_delta: {path}/{name} is a "
            f"{type(value).__name__}, not an array. Give arrays "
            f"(jnp.asarray(...)) of {describe_array(old)}.")
      if (tuple(np.shape(value)) != tuple(old.shape)
          or np.dtype(value.dtype) != np.dtype(old.dtype)):
        raise ValueError(
            f"lora_jax.nnx.set_delta: {path}/{name} is "
            f"{describe_array(value)}, this module's is "
            f"{describe_array(old)}. Use a delta of the same rank and dtype "
            f"(cast it first: jax.tree.map(lambda x: x.astype(...), delta)).")
      if is_concrete(old) and is_concrete(value):
        value = jax.device_put(value, old.sharding)
      updates.append((var, value))
  for var, value in updates:  # all checked first: no half-loaded module
    _set(var, value)


def merge(m: nnx.Module) -> nnx.Module:
  """A plain model of the wrapped class with the adapters folded in.

  Its ``nnx.Param`` leaves are :func:`lora_jax.merge` of the frozen base and
  :func:`get_delta` (a quantized base dequantized), its other state a copy of
  ``m``'s; it has no ``nnx.LoRAParam`` and shares no Variable with ``m``.

  Args:
    m: a module from :func:`apply_lora`.

  Returns:
    An instance of the class given to :func:`apply_lora`.

  Raises:
    TypeError: ``m`` is not from :func:`apply_lora`.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, lora_jax.nnx as ljn
  >>> from flax import nnx
  >>> linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> m = ljn.apply_lora(linear, lj.LoraConfig(rank=2, init="pissa"),
  ...                    jax.random.key(1))
  >>> plain = ljn.merge(m)
  >>> type(plain).__name__, bool(jnp.allclose(plain(jnp.ones(4)), m(jnp.ones(4))))
  ('Linear', True)
  """
  m = _lora_module(m, "merge")
  graphdef, params, rest = _split(m.base_model)
  merged = dequantize(merge_trees(params, m.lora_deltas()))
  return nnx.merge(graphdef, *_fresh((merged, rest)))
