"""Every node's output shape of a traced graph, found without computing anything.

A build needs the shape of every node of the graph it traced (levels are read
off the maps' reductions). The graph runs on the meta device: tensors carry
shapes, strides and dtypes and no data. Meta kernels compute nothing, but
many of torch's are written in Python (``layer_norm``, ``gelu``, ``addmm``
decompose into a dozen reference ops each), so running ViT-B's graph that way
was half of building its feature model.

Most of a backbone's graph repeats: twelve identical blocks in a ViT-B, 27 in
the third stage of a ConvNeXt-B. :class:`MetaShapeProp` keeps what each node
gave, keyed by everything that decides a meta result (the op, the shapes,
strides and dtypes of its tensors, its other arguments, and for a module of
``torch.nn`` its class, settings and parameter shapes), and hands a node whose
key it has seen fresh meta tensors of the kept shapes instead of running it
again. Whatever the key cannot describe runs as it is: a function outside
torch (a library's own wrapped function), a module outside ``torch.nn`` or one
with hooks, an op that writes to its arguments (``unsqueeze_``, ``out=``), a
result that is not tensors, numbers and tuples of them. So the
shapes are exactly those of running every node, at a fraction of the cost
(tested against torch's own ``ShapeProp`` on real tensors, on torchvision's
models and on graphs built to trip each of these guards).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["MetaShapeProp", "ShapeRecorder", "quiet_shape_prop"]


@dataclass(frozen=True)
class TensorShape:
    """A node's output shape, as ``node.meta["tensor_meta"]`` holds it."""

    shape: tuple[int, ...]


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records each node's output shape(s) in ``node.meta``.

    Our own rather than torch's ``ShapeProp``, which prints a traceback to stderr
    for every node that fails before raising: a probe that fails must fail quietly,
    with one unifeat error. ``graph`` runs over ``module``'s attributes (a replica
    of the traced model), so no ``GraphModule`` needs to be made for it.
    """

    def __init__(
        self, module: nn.Module, graph: fx.Graph | None = None, fake_mode: Any = None
    ) -> None:
        super().__init__(module, graph=graph)
        self.fake_mode = fake_mode

    def run_node(self, n: fx.Node) -> Any:
        if self.fake_mode is not None:
            from torch._dispatch.python import enable_python_dispatcher

            with self.fake_mode, enable_python_dispatcher():
                result = super().run_node(n)
        else:
            result = super().run_node(n)
        record(n, result)
        return result

    def propagate(self, example: Tensor) -> Any:
        return self.run(example)


def record(node: fx.Node, result: Any) -> None:
    """Keep ``result``'s shape(s) on ``node``."""
    found = _shapes_in(result)
    if found is not None:
        node.meta["tensor_meta"] = found


def _shapes_in(value: Any) -> Any:
    """A tensor's shape, or the same structure of shapes for a tuple or list."""
    if isinstance(value, Tensor):
        return TensorShape(tuple(value.shape))
    if isinstance(value, (tuple, list)):
        inner = [_shapes_in(item) for item in value]
        return tuple(inner) if any(item is not None for item in inner) else None
    return None


def quiet_shape_prop(module: nn.Module, graph: fx.Graph | None, mode: Any, example: Tensor) -> None:
    """:class:`ShapeRecorder` under a fake-tensor ``mode``, without its log."""
    # Fake tensors log every op that fails on the meta device, with a traceback;
    # the failure itself becomes one unifeat error, so the log says nothing new.
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        ShapeRecorder(module, graph, fake_mode=mode).propagate(example)
    finally:
        logger.setLevel(level)


# -- keys: what decides a node's meta result ---------------------------------------------

# Python values that stand for themselves in a key (their type too: 1, 1.0 and True
# are equal in Python, but not as arguments of an op).
_PLAIN = (
    bool,
    int,
    float,
    complex,
    str,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)

# Builtins a traced graph calls that depend on their arguments only.
_PURE_BUILTINS = frozenset(
    {"getattr", "len", "int", "float", "bool", "abs", "max", "min", "round", "pow", "divmod"}
)

# Forward-time hook stores of a module: with any hook in them a call is not only the
# module's own code.
_CALL_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _in_place(name: str) -> bool:
    """``add_``, ``unsqueeze_``, ``operator.iadd``: an op that writes to its argument,
    whose shape some of them change, so it is run, never looked up."""
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS


_IN_PLACE_OPERATORS = frozenset(
    {
        *("iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow"),
        *("iand", "ior", "ixor", "ilshift", "irshift", "iconcat", "setitem", "delitem"),
    }
)


def _pure_function(target: Any) -> bool:
    """Whether a ``call_function`` target is torch's, ``operator``'s, ``math``'s or a
    pure builtin, and writes to none of its arguments: its result is decided by
    its arguments."""
    owner = getattr(target, "__module__", None)
    name = getattr(target, "__name__", None)
    if not isinstance(owner, str) or not isinstance(name, str) or _in_place(name):
        return False
    if owner == "builtins":
        return name in _PURE_BUILTINS
    return owner in ("_operator", "operator", math.__name__) or owner.split(".")[0] == "torch"


def value_key(value: Any) -> Hashable | None:
    """What of ``value`` a meta op can see, hashable; None where that is unknown."""
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, nn.Parameter) or not value.is_meta:
            return None
        if value.layout is not torch.strided:
            return None
        return (
            "tensor",
            tuple(value.shape),
            value.stride(),
            value.storage_offset(),
            value.dtype,
            value.requires_grad,
        )
    if isinstance(value, torch.Size):
        return ("size", tuple(value))
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if type(value) in (tuple, list):
        items = [value_key(item) for item in value]
        if any(item is None for item in items):
            return None
        return (type(value), tuple(items))
    if isinstance(value, slice):
        parts = [value_key(part) for part in (value.start, value.stop, value.step)]
        return None if any(part is None for part in parts) else ("slice", tuple(parts))
    if value is Ellipsis:
        return ("ellipsis",)
    return None


def runs_torch_code(cls: type) -> bool:
    """Whether calling a module of ``cls`` runs ``torch.nn``'s own code only: each class
    of its lineage is one of ``torch.nn``'s modules, or sets a module up and
    nothing else (``__init__``; torchvision's ``MLP`` and ``Conv2dNormActivation``
    are ``nn.Sequential`` built so). A class that defines ``forward``, or anything
    a call might reach, is the library's own code."""
    # Not cached: a class may be patched between builds.
    return all(
        klass is object
        or klass.__module__.startswith("torch.nn.modules.")
        or vars(klass).keys() <= _SET_UP_ONLY
        for klass in cls.__mro__
    )


# What a class may define and still run its torch.nn base class's code when called.
_SET_UP_ONLY = frozenset(
    {
        *("__init__", "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__"),
        *("__annotations__", "__firstlineno__", "__static_attributes__", "__constants__"),
        *("_version", "_load_from_state_dict", "extra_repr", "reset_parameters"),
    }
)


def module_key(module: nn.Module) -> Hashable | None:
    """What decides the meta result of calling a module that runs ``torch.nn``'s code
    (:func:`runs_torch_code`): its class, its settings (plain attributes), its
    tensors' shapes and its children's keys. None for any other module (its code
    may read anything), one with hooks, or one with an attribute a key cannot
    describe."""
    cls = type(module)
    if not runs_torch_code(cls):
        return None
    state = module.__dict__
    if any(state.get(name) for name in _CALL_HOOKS):
        return None
    settings = []
    for name, value in state.items():
        if name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            continue
        if "hooks" in name or name.endswith("_hooks_always_called"):
            continue  # forward-time ones are empty (above); the rest never run in a call
        key = value_key(value)
        if key is None:
            return None
        settings.append((name, key))
    tensors = []
    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            key = None if tensor is None else value_key(tensor)
            if tensor is not None and key is None:
                return None
            tensors.append((name, key))
    children = []
    for name, child in module._modules.items():
        key = None if child is None else module_key(child)
        if child is not None and key is None:
            return None
        children.append((name, key))
    return (cls, tuple(settings), tuple(tensors), tuple(children))


def _global_hooks() -> bool:
    """Whether hooks registered for every module are in place (they run in every call)."""
    from torch.nn.modules import module as module_

    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(getattr(module_, name, None) for name in names)


# -- results: kept as templates, handed out as fresh tensors ------------------------------


def _template(value: Any) -> Any:
    """``value`` with each tensor replaced by its shape, stride and dtype; None where it
    holds anything else than tensors, plain values and plain tuples and lists."""
    if isinstance(value, Tensor):
        plain = type(value) is Tensor and value.is_meta and value.layout is torch.strided
        if not plain or value.storage_offset() != 0 or value.requires_grad:
            return None
        return _Tensor(tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, (torch.Size, *_PLAIN)):
        return _Value(value)
    if type(value) in (tuple, list):
        items = [_template(item) for item in value]
        return None if any(item is None for item in items) else _Items(type(value), items)
    return None


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


@dataclass(frozen=True)
class _Value:
    value: Any

    def make(self) -> Any:
        return self.value  # immutable


@dataclass(frozen=True)
class _Items:
    kind: type
    items: list[Any]

    def make(self) -> Any:
        return self.kind(item.make() for item in self.items)


# -- the interpreter -------------------------------------------------------------------------


class MetaShapeProp(ShapeRecorder):
    """Shape propagation on the meta device that runs each distinct node once (see
    the module docstring), with a shortcut for attention whose weights are not
    asked for: its output has the query's shape (running ``nn.MultiheadAttention``
    op by op on the meta device was half of ``feature_info("tv:vit_h_14")``)."""

    def __init__(self, module: nn.Module, graph: fx.Graph | None = None) -> None:
        super().__init__(module, graph)
        self._results: dict[Hashable, Any] = {}
        self._modules: dict[str, Hashable | None] = {}
        self._module_calls = not _global_hooks()

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        key = self._key(n, args, kwargs)
        kept = self._results.get(key) if key is not None else None
        if kept is not None:
            result = kept.make()
        else:
            result = getattr(self, n.op)(n.target, args, kwargs)
            if key is not None:
                template = _template(result)
                if template is not None:
                    self._results[key] = template
        record(n, result)
        return result

    def _key(self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
        if n.op == "call_function":
            if not _pure_function(n.target):
                return None
            target: Hashable = n.target
        elif n.op == "call_method":
            if not args or not isinstance(args[0], Tensor) or _in_place(str(n.target)):
                return None  # a method of something else than a tensor, or in place
            target = n.target
        elif n.op == "call_module":
            if not self._module_calls:
                return None
            name = str(n.target)
            if name not in self._modules:
                self._modules[name] = module_key(self.fetch_attr(name))
            target = self._modules[name]
            if target is None:
                return None
        else:
            return None
        if "out" in kwargs:
            return None  # written to, and resized
        arguments = value_key(args)
        options = value_key(tuple(sorted(kwargs.items())))
        if arguments is None or options is None:
            return None
        return (n.op, target, arguments, options)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if (
            isinstance(module, nn.MultiheadAttention)
            and kwargs.get("need_weights") is False
            and isinstance(args[0], Tensor)
            and args[0].is_meta
        ):
            return torch.empty_like(args[0]), None
        return super().call_module(target, args, kwargs)
