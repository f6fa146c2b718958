"""Levels found on a traced FX graph, and the runner that executes the cut graph.

One trace with torchvision's own tracer (its leaf-module and node-naming
conventions), in eval mode; the train-mode graph is traced only where the
traced code read a ``training`` flag (:mod:`unifeat._engine.modes`), since
elsewhere it is the same graph. One shape propagation on the meta device, which
runs each distinct node of repeated blocks once (:mod:`unifeat._engine.shapes`).
From those: node names (torchvision's), the automatic level list, and graph
modules that compute only what the requested levels need. A build compiles one
``GraphModule`` (the cut eval graph).

How levels are found
--------------------
A node is a *cut point* when it is the only activation alive after it runs:
everything later depends on it alone. For each reduction ``r`` (input size /
map size, rounded to a power of two), the level is the output of the last
stage at ``r``: take the first node ``D`` above ``r``, walk up ``D``'s module
ancestors while each ancestor's single external input is a cut point at ``r``,
and take the shallowest such input (the output of the block *before* the one
that downsamples). Where no ancestor qualifies, the last cut point at ``r``
before ``D``. Token models (``[N, L, C]`` after a patch embedding) get one
level per block of their block container.

The final output (``forward_intermediates``) is the last cut point before the
classifier head (pooling, flatten, logits) whose tensor has the deepest
level's grid: the input of the global pooling, after the final norm.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import Tensor, fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from unifeat._engine.dilation import SPATIAL_OPS
from unifeat._engine.levels import FeatureMap, Level, spatial, to_map, token_grid
from unifeat._engine.meta import meta_replica, replica
from unifeat._engine.model import Runner, final_norm_refusal
from unifeat._engine.modes import watching_mode_reads
from unifeat._engine.resize import PositionEmbedding, make_resizable
from unifeat._engine.shapes import MetaShapeProp, ShapeRecorder, quiet_shape_prop
from unifeat._errors import InvalidNodeError, TracingError, UnsupportedOptionError, close_matches

# Top-level modules that belong to a classifier head, never to a feature level:
# pooling, the final layout change of Swin-likes, logits. A final norm is not
# listed: it is part of the final output, though never of a level.
HEAD_MODULES = frozenset(
    {
        "avgpool",
        "global_pool",
        "flatten",
        "fc",
        "classifier",
        "head",
        "heads",
        "dropout",
        "permute",
        "pre_logits",
        "last_linear",
        "logits",
    }
)
# A top-level norm after the blocks is the final norm: it shapes the final
# output but is never a level of its own.
FINAL_NORM_MODULES = frozenset({"norm"})
# Functions called by the root module's forward that start its head.
HEAD_FUNCTIONS = frozenset({"adaptive_avg_pool2d", "adaptive_max_pool2d", "flatten", "mean"})


def tracer_kwargs(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """torchvision's tracer defaults, plus timm's "do not trace" registrations and
    the user's own ``tracer_kwargs``.

    Same leaf modules and auto-wrapped modules as torchvision's own
    ``get_graph_node_names``, so node names come out identical to its. An
    adapter's ``trace_through`` entry lists ``torchvision.ops`` module classes
    traced into instead (torchvision keeps its ``FeaturePyramidNetwork`` whole,
    whose outputs are then no nodes of their own).
    """
    from torchvision.models import feature_extraction

    result = dict(extra or {})
    through = tuple(result.pop("trace_through", ()))
    result["autowrap_modules"] = tuple(
        dict.fromkeys([*result.get("autowrap_modules", ()), math, torchvision.ops])
    )
    modules, functions = _timm_notrace()
    ops = [m for m in feature_extraction._get_leaf_modules_for_ops() if m not in through]
    leaves = [*result.get("leaf_modules", ()), *ops]
    result["leaf_modules"] = list(dict.fromkeys([*leaves, *modules]))
    wrapped = [*result.get("autowrap_functions", ()), *functions]
    if wrapped:
        result["autowrap_functions"] = tuple(dict.fromkeys(wrapped))
    return result


def _timm_notrace() -> tuple[list[type], list[Any]]:
    """The modules and functions timm registers as not traceable, where timm is loaded."""
    registry = sys.modules.get("timm.layers._fx")
    if registry is None:
        return [], []
    modules = [m for m in registry.get_notrace_modules() if isinstance(m, type)]
    return modules, list(registry.get_notrace_functions())


@dataclass
class Trace:
    """One traced graph and torchvision-style names for its nodes."""

    graph: fx.Graph
    names: dict[fx.Node, str]
    constants: dict[str, Tensor] = field(default_factory=dict)
    """Tensors the tracer lifted out of the forward's code (timm Swin's masks), by the
    root attribute name its ``get_attr`` nodes read. The traced module does not get
    them (it may be a module passed in): see :func:`with_constants`."""
    mode_dependent: bool = True
    """Whether the traced code read a module's ``training`` flag (or whether that
    could not be told): only then can the other mode's graph differ
    (:mod:`unifeat._engine.modes`)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Trace:
        # fx.Graph deep-copies its nodes without the memo, so the name map is
        # rebuilt on the copied nodes (by their unique graph names).
        graph = copy.deepcopy(self.graph, memo)
        copied = {node.name: node for node in graph.nodes}
        names = {copied[node.name]: name for node, name in self.names.items()}
        constants = copy.deepcopy(self.constants, memo)
        return Trace(graph, names, constants, mode_dependent=self.mode_dependent)

    def __getstate__(self) -> dict[str, Any]:
        # Functions the pickler cannot name by their qualified name (torch's
        # boolean-dispatch F.max_pool2d: "boolean_dispatch.<locals>.fn") travel as the
        # module attribute they are, in a copy of the graph that never held them (a
        # graph keeps every target it had in a lookup table): the live one is kept.
        graph = fx.Graph()
        copied: dict[fx.Node, fx.Node] = {}
        for node in self.graph.nodes:
            target = node.target
            if node.op == "call_function" and _unnamed(target):
                target = _Attribute(target.__module__, target.__name__)
            copied[node] = graph.create_node(
                node.op,
                target,
                fx.node.map_arg(node.args, copied.__getitem__),
                fx.node.map_arg(node.kwargs, copied.__getitem__),
                node.name,
                node.type,
            )
            copied[node].meta = dict(node.meta)
        names = {copied[node]: name for node, name in self.names.items()}
        return {"graph": graph, "names": names, "constants": self.constants}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for node in state["graph"].nodes:
            if isinstance(node.target, _Attribute):
                node.target = node.target.resolve()
        self.__dict__.update(state)

    def attach_constants(self, module: nn.Module) -> None:
        """Give ``module``, a model the build owns (never one passed in), the lifted
        constants, for graph modules and functions over it to read."""
        for name, value in self.constants.items():
            setattr(module, name, value)

    def node(self, name: str) -> fx.Node | None:
        return next((n for n, q in self.names.items() if q == name), None)


@dataclass(frozen=True)
class _Attribute:
    """A module attribute by name, for pickling a function by the name it is found
    under rather than by its qualified name."""

    module: str
    name: str

    def resolve(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def _unnamed(function: Any) -> bool:
    """A function pickle cannot find by its qualified name, but its module holds
    under its ``__name__``."""
    module, name = getattr(function, "__module__", None), getattr(function, "__name__", None)
    if not isinstance(module, str) or not isinstance(name, str):
        return False
    if getattr(function, "__qualname__", name) == name:
        return False
    holder = sys.modules.get(module)
    return holder is not None and getattr(holder, name, None) is function


class _FastNodePathTracer(NodePathTracer):
    """torchvision's tracer with its node naming in constant time per node.

    torchvision finds a name's ``_N`` suffix by matching every earlier name
    against a regular expression: quadratic in the graph size, a quarter of
    building a ConvNeXt-B feature model. The same rule, kept in a dict: the
    suffix follows the most recent earlier name of the form ``base`` (-> ``_1``)
    or ``base_N`` (-> ``_{N+1}``). Names are identical to torchvision's (tested
    on all its classification models).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._latest_suffix: dict[str, int] = {}
        self._thread = threading.get_ident()

    # FX patches nn.Module.__call__ and __getattr__ for every thread while it
    # traces: a module another thread runs meanwhile (a forward, another build's
    # probe) would be recorded into this graph, or fail. Only this thread traces.

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _get_node_qualname(self, module_qualname: str, node: fx.Node) -> str:
        qualname = module_qualname
        if node.op != "call_module":
            qualname = f"{qualname}.{node}" if qualname else str(node)
        base, _, digits = qualname.rpartition("_")
        if base and digits.isdigit():
            qualname = base  # drop torch.fx's graph-wide suffix; a local one follows
        previous = self._latest_suffix.get(qualname)
        name = qualname if previous is None else f"{qualname}_{previous + 1}"
        self._record(name)
        return name

    def _record(self, name: str) -> None:
        self._latest_suffix[name] = 0
        base, _, digits = name.rpartition("_")
        if base and digits.isdigit():
            self._latest_suffix[base] = int(digits)


# torch.fx's tracer patches nn.Module.__call__/__getattr__ process-wide while it
# traces (the tracer lets other threads' calls through, above): two traces at once
# would restore each other's patches. Traces are rare and short, so they take turns.
_SOURCE_LOCK = threading.RLock()


def trace(
    module: nn.Module,
    *,
    train: bool,
    context: str,
    extra_tracer_kwargs: Mapping[str, Any] | None = None,
) -> Trace:
    """Trace ``module`` in train or eval mode, on a replica over its tensors: the
    mode switch never shows on ``module`` (a caller's frozen norm layers stay frozen,
    and a build reading its modes in another thread sees the caller's)."""
    return traced(module, train=train, context=context, extra_tracer_kwargs=extra_tracer_kwargs)[0]


def traced(
    module: nn.Module,
    *,
    train: bool,
    context: str,
    extra_tracer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Trace, nn.Module]:
    """:func:`trace`, and the replica it traced (in that mode, holding the lifted
    constants), which nothing else holds: a shape pass may take it over."""
    tracer = _FastNodePathTracer(**tracer_kwargs(extra_tracer_kwargs))
    with _SOURCE_LOCK:
        return _trace_locked(module, tracer, train=train, context=context)


def _trace_locked(
    module: nn.Module, tracer: _FastNodePathTracer, *, train: bool, context: str
) -> tuple[Trace, nn.Module]:
    traced = replica(module)
    try:
        traced.train(train)
        with watching_mode_reads(traced) as reads:
            graph = tracer.trace(traced)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TracingError(
            f"FX could not trace {context} ({'train' if train else 'eval'} mode): "
            f"{type(exc).__name__}: {first_line}. Ways out: build it through its own "
            "backend (backend='timm', ...), make the failing submodule a leaf with "
            "tracer_kwargs={'leaf_modules': [...]}, or pick levels from a module whose "
            "blocks are in an nn.ModuleList/nn.Sequential (found with hooks)"
        ) from exc
    # The tracer stores the tensor constants it lifts out of the code on the module
    # it traced: the replica, so the trace keeps them.
    constants = {
        name: value
        for name, value in traced.__dict__.items()
        if isinstance(value, Tensor) and name not in module.__dict__
    }
    names = dict(tracer.node_to_qualname)
    return Trace(graph, names, constants, mode_dependent=reads.read), traced


def same_program(first: Trace, second: Trace) -> bool:
    """Whether two traces are one program: the same nodes in the same order, with the
    same names, targets and arguments. Names alone are not enough: torchvision's
    Swin passes ``training=self.training`` to a wrapped function, so its train
    graph differs from its eval graph in an argument only (its dropout)."""
    nodes = list(first.graph.nodes), list(second.graph.nodes)
    if len(nodes[0]) != len(nodes[1]):
        return False

    def name_in(trace_: Trace) -> Any:
        return lambda node: trace_.names.get(node, node.name)

    for one, other in zip(*nodes, strict=True):
        if one.op != other.op or name_in(first)(one) != name_in(second)(other):
            return False
        mine = fx.node.map_arg((one.target, one.args, one.kwargs), name_in(first))
        theirs = fx.node.map_arg((other.target, other.args, other.kwargs), name_in(second))
        try:
            if bool(mine != theirs):
                return False
        except Exception:
            return False  # arguments that do not compare (tensors): told apart
    return True


def with_constants(module: nn.Module, trace_: Trace) -> nn.Module:
    """``module`` for an ``fx.GraphModule`` of ``trace_``: itself, or where the trace
    lifted constants, a copy of its top level (its children, tensors and attributes
    shared) that holds them too; ``module`` is not written."""
    if not trace_.constants:
        return module
    holder = object.__new__(type(module))
    holder.__dict__.update(module.__dict__)
    holder.__dict__.update(trace_.constants)
    return holder


# -- shapes ---------------------------------------------------------------------------


def propagate_shapes(
    source: nn.Module,
    trace_: Trace,
    example: Tensor,
    *,
    fake: bool,
    eval_mode: bool,
    taken: nn.Module | None = None,
) -> dict[fx.Node, Any]:
    """Every node's output shape of ``trace_`` run over ``source``, computing nothing.

    Meta tensors throughout (:mod:`unifeat._engine.shapes`, which runs each distinct
    node of repeated blocks once); for a real module (``fake=True``) its weights
    are stood in for by meta tensors, never copied. Everything runs on a replica
    of ``source`` (in eval mode with ``eval_mode``; in ``source``'s modes
    otherwise): ``taken``, the replica the trace ran on, which nothing else holds
    (see :func:`traced`), or a new one; ``source`` is never written. Nodes whose
    value is not a tensor get the shapes of what they hold (a tuple of shapes),
    or nothing.
    """
    graph = trace_.graph
    if fake:
        try:
            probe = _meta_probe(source, trace_, eval_mode, weights=True, taken=taken)
            with torch.no_grad():
                MetaShapeProp(probe, graph).propagate(example.to("meta"))
        except Exception:
            # Tensors the forward makes on the CPU (Swin V2's position grids)
            # do not mix with meta ones; fake tensors take them in.
            from torch._subclasses.fake_tensor import FakeTensorMode

            probe = replica(with_constants(source, trace_))
            if eval_mode:
                probe.eval()
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            try:
                quiet_shape_prop(probe, graph, mode, mode.from_tensor(example))
            except Exception:
                # Data-dependent code (a leaf module that branches on values) needs
                # values: one real forward of zeros without grad, on a replica in eval
                # mode, so that no norm updates the source's running statistics.
                with torch.no_grad():
                    ShapeRecorder(probe.eval(), graph).propagate(
                        torch.zeros(example.shape, dtype=example.dtype)
                    )
    else:
        probe = _meta_probe(source, trace_, eval_mode, weights=False, taken=taken)
        with torch.no_grad():
            MetaShapeProp(probe, graph).propagate(example)
    shapes: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node] = tuple(meta.shape)
    return shapes


def _meta_probe(
    source: nn.Module,
    trace_: Trace,
    eval_mode: bool,
    *,
    weights: bool,
    taken: nn.Module | None = None,
) -> nn.Module:
    """A replica of ``source`` to run ``trace_``'s graph over on the meta device: meta
    stand-ins for its weights (``weights``: it has real ones) and for the tensor
    constants the trace lifted, which the graph reads off the top level. ``taken``
    (a replica of ``source`` nothing else holds) gets them in place, which is a
    third of making another."""
    if taken is None:
        probe = meta_replica(source) if weights else replica(source)
    else:
        probe = taken
        if weights:
            _stand_ins_in_place(probe)
    for name, value in trace_.constants.items():
        probe.__dict__[name] = torch.empty_like(value, device="meta")
    return probe.eval() if eval_mode else probe


def _stand_ins_in_place(probe: nn.Module) -> None:
    """Meta stand-ins for the parameters and buffers of ``probe``, a replica whose
    stores are its own (:func:`~unifeat._engine.meta.replica`): the source it
    copies keeps its tensors. Tied tensors get one stand-in."""
    by_id: dict[int, Tensor] = {}
    for module in probe.modules():
        stores: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for store in stores:
            for name, tensor in store.items():
                if tensor is None:
                    continue
                found = by_id.get(id(tensor))
                if found is None:
                    found = by_id[id(tensor)] = torch.empty_like(tensor, device="meta")
                store[name] = found


def _is_meta(module: nn.Module) -> bool:
    return next(iter(module.parameters()), torch.empty(0)).is_meta


def shapes_of(
    source: nn.Module,
    evaluation: Trace,
    input_size: tuple[int, int, int],
    *,
    context: str,
    taken: nn.Module | None = None,
) -> dict[fx.Node, Any]:
    """Every node's output shape for a batch of 2 at ``input_size``, in eval mode.

    Two samples and eval mode, so that norm layers after a global pool (LeViT)
    see the statistics they need, whatever mode the module is in. The graph runs
    over a replica of ``source`` (no ``GraphModule`` is made for it): the source's
    own modes stay as they are for whoever runs or builds from it meanwhile.
    ``taken``: the replica ``evaluation`` was traced on (:func:`traced`), which the
    pass may take over.
    """
    channels, height, width = input_size
    on_meta = _is_meta(source)
    example = torch.empty(2, channels, height, width, device="meta" if on_meta else "cpu")
    with _SOURCE_LOCK:
        try:
            return propagate_shapes(
                source, evaluation, example, fake=not on_meta, eval_mode=True, taken=taken
            )
        except Exception as exc:
            raise UnsupportedOptionError(
                f"could not run {context} on a 2x{channels}x{height}x{width} input to find "
                f"its levels ({type(exc).__name__}: {_first_line(exc)}); for a module of your "
                "own, pass the input it takes: input_size=(H, W), or input_size=(C, H, W) for "
                f"other than {channels} channels"
            ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- levels ---------------------------------------------------------------------------


def module_path(node: fx.Node, names: Mapping[fx.Node, str]) -> str:
    """The module a node belongs to: the module itself for call_module nodes."""
    if node.op == "call_module":
        return str(node.target)
    name = names.get(node, "")
    return name.rpartition(".")[0]


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _inside(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")


def _within(path: str, modules: set[str]) -> bool:
    """Whether ``path`` is one of ``modules`` or inside one: :func:`_inside` for many
    at once, in the time of a few lookups."""
    if path in modules:
        return True
    dot = path.find(".")
    while dot != -1:
        if path[:dot] in modules:
            return True
        dot = path.find(".", dot + 1)
    return False


@dataclass
class _Graph:
    """The facts every level rule reads off one traced, shape-propagated graph."""

    trace: Trace
    shapes: Mapping[fx.Node, Any]
    order: list[fx.Node]
    position: dict[fx.Node, int]
    cut: set[fx.Node]

    @classmethod
    def of(
        cls, trace_: Trace, shapes: Mapping[fx.Node, Any], *, head_modules: Iterable[str] = ()
    ) -> _Graph:
        """``head_modules``: modules an adapter marks as head; what they read does not
        stay alive for the cut-point rule (an FPN reads every stage's output, yet
        each stage still ends where the next one starts)."""
        # Only tensors computed from the input are activations: parameter-only
        # subgraphs (e.g. Swin V2's position-bias MLP) never break a stage boundary.
        from_input: set[fx.Node] = set()
        for node in trace_.graph.nodes:
            if node.op == "placeholder" or any(a in from_input for a in node.all_input_nodes):
                from_input.add(node)
        order = [
            n for n in trace_.graph.nodes if n.op not in ("get_attr", "output") and n in from_input
        ]
        position = {n: i for i, n in enumerate(order)}
        heads = tuple(head_modules)
        in_head = {
            n
            for n in order
            if heads and any(_inside(module_path(n, trace_.names), h) for h in heads)
        }
        last_use = {
            n: max(
                (position[u] for u in n.users if u in position and u not in in_head),
                default=position[n],
            )
            for n in order
        }
        cut: set[fx.Node] = set()
        alive_until = -1
        for i, node in enumerate(order):
            if node.op != "placeholder" and alive_until <= i:
                cut.add(node)
            alive_until = max(alive_until, last_use[node])
        return cls(trace_, shapes, order, position, cut)

    def body(self, head: Iterable[str]) -> list[fx.Node]:
        """The nodes before the first node of ``head`` modules or a head function."""
        heads = set(head)
        names = self.trace.names
        body = []
        for node in self.order:
            if node.op == "placeholder":
                continue
            path = module_path(node, names)
            if path and _within(path, heads):
                break
            if not path and names.get(node, "").rstrip("_0123456789") in HEAD_FUNCTIONS:
                break
            body.append(node)
        return body


def derive_levels(
    graph: _Graph, size: tuple[int, int], *, head_modules: Iterable[str] = ()
) -> list[Level]:
    """The automatic level list of a traced model (see the module docstring)."""
    names = graph.trace.names
    body = graph.body(HEAD_MODULES | FINAL_NORM_MODULES | set(head_modules))
    tokens = _token_levels(graph, body, size)
    if tokens:
        return tokens
    info: dict[fx.Node, tuple[str, int, int]] = {}
    for node in body:
        shape = graph.shapes.get(node)
        found = spatial(shape, size) if isinstance(shape, tuple) else None
        if found is not None:
            info[node] = found
    levels: list[Level] = []
    previous: fx.Node | None = None
    for r in sorted({r for _, r, _ in info.values()}):
        at_r = [n for n in body if n in info and info[n][1] == r]
        above = next(
            (
                n
                for n in body
                if n in info and info[n][1] > r and graph.position[n] > graph.position[at_r[0]]
            ),
            None,
        )
        chosen = _stage_output(graph, above, r, info) if above else None
        if chosen is None:
            before = [n for n in at_r if above is None or graph.position[n] < graph.position[above]]
            cut_before = [n for n in before if n in graph.cut]
            chosen = (cut_before or before or at_r)[-1]
        layout, reduction_, channels = info[chosen]
        label = _module_of_output(graph, chosen, previous)
        levels.append(
            Level(
                label,
                channels,
                reduction_,
                "NHWC" if layout == "NHWC" else "NCHW",
                where=names[chosen],
                extra={"node": names[chosen]},
            )
        )
        previous = chosen
    return levels


def _stage_output(
    graph: _Graph, above: fx.Node, r: int, info: Mapping[fx.Node, tuple[str, int, int]]
) -> fx.Node | None:
    names = graph.trace.names
    chosen = None
    for ancestor in _ancestors(module_path(above, names)):
        inside = [n for n in graph.order if _inside(module_path(n, names), ancestor)]
        external = {
            arg
            for n in inside
            for arg in n.all_input_nodes
            if arg in graph.position and not _inside(module_path(arg, names), ancestor)
        }
        if len(external) != 1:
            break
        (source,) = external
        if source not in graph.cut or source not in info or info[source][1] != r:
            break
        chosen = source
    return chosen


def _module_of_output(graph: _Graph, node: fx.Node, after: fx.Node | None = None) -> str:
    """The shallowest module whose output ``node`` is (its last node), else the node name.

    A module that also ran before ``after`` (the previous level) would name
    several levels ("features"), so the label stops below it ("features.7").
    """
    names, order = graph.trace.names, graph.order
    best = names[node]
    start = graph.position[after] + 1 if after is not None and after in graph.position else 0
    for ancestor in _ancestors(module_path(node, names)):
        members = [i for i, n in enumerate(order) if _inside(module_path(n, names), ancestor)]
        if not members or order[members[-1]] is not node or members[0] < start:
            break
        best = ancestor
    return best


def _token_levels(graph: _Graph, body: list[fx.Node], size: tuple[int, int]) -> list[Level]:
    """One level per block for ViT-style models whose body runs on ``[N, L, C]`` tokens."""
    names, shapes = graph.trace.names, graph.shapes
    grid = None
    for node in body:
        shape = shapes.get(node)
        if not isinstance(shape, tuple):
            continue
        found = spatial(shape, size)
        if found is not None and found[0] == "NCHW":
            grid = (shape[2] * shape[3], found[1])
        elif grid is not None and token_grid(shape, grid[0]) is not None:
            break
    else:
        return []
    if grid is None:
        return []
    cells, reduction_ = grid
    token_cuts = {
        n
        for n in body
        if n in graph.cut
        and isinstance(shapes.get(n), tuple)
        and token_grid(shapes[n], cells) is not None
    }
    # Blocks: the children of one container that each end at a token cut point.
    last_node: dict[str, fx.Node] = {}
    for node in body:
        for ancestor in _ancestors(module_path(node, names)):
            last_node[ancestor] = node
    by_container: dict[str, list[tuple[str, fx.Node]]] = {}
    for module, node in last_node.items():
        parent = module.rpartition(".")[0]
        if parent and node in token_cuts:
            by_container.setdefault(parent, []).append((module, node))
    if not by_container:
        return []
    blocks = max(by_container.values(), key=len)
    if len(blocks) < 2:
        return []
    blocks.sort(key=lambda block: graph.position[block[1]])
    return [
        Level(
            block,
            int(shapes[node][2]),
            reduction_,
            "tokens",
            where=names[node],
            num_prefix_tokens=int(shapes[node][1]) - cells,
            extra={"node": names[node]},
        )
        for block, node in blocks
    ]


def final_node(graph: _Graph, deepest: Level) -> str:
    """The node whose value is the final output: the last cut point before the head
    with the deepest level's grid (the input of the global pool)."""
    names = graph.trace.names
    body = graph.body(HEAD_MODULES)
    by_name = {name: node for node, name in names.items()}
    start = by_name.get(deepest.where)
    if start is None or start not in graph.position:
        return deepest.where
    reference = graph.shapes.get(start)
    chosen = start
    for node in body:
        if graph.position[node] <= graph.position[start] or node not in graph.cut:
            continue
        shape = graph.shapes.get(node)
        if (
            isinstance(shape, tuple)
            and isinstance(reference, tuple)
            and _same_grid(shape, reference, deepest.layout)
        ):
            chosen = node
    return names[chosen]


def _same_grid(shape: tuple[int, ...], reference: tuple[int, ...], layout: str) -> bool:
    if len(shape) != len(reference):
        return False
    if layout == "NCHW":
        return shape[2:] == reference[2:]
    if layout == "NHWC":
        return shape[1:3] == reference[1:3]
    return shape[:2] == reference[:2]  # tokens: the same number of tokens


def relevel(
    levels: Sequence[Level], shapes_by_name: Mapping[str, Any], size: tuple[int, int]
) -> list[Level]:
    """The same level nodes read off another build of the architecture (e.g. dilated)."""
    result = []
    for level in levels:
        shape = shapes_by_name.get(level.where)
        found = spatial(shape, size) if isinstance(shape, tuple) else None
        result.append(level.with_reduction(found[1] if found else level.reduction))
    return result


# -- return_nodes -------------------------------------------------------------------------


def resolve_return_nodes(
    requested: Sequence[str] | Mapping[str, str], available: Sequence[str], *, context: str
) -> dict[str, str]:
    """Map each requested (full or truncated) name to one available name: ``{name: key}``.

    A truncated name (``"layer4"``) means the last node inside that module, as in
    torchvision. Unknown names, and two requests naming one node, raise
    :class:`InvalidNodeError` with close matches. Serves FX node names and
    module paths alike.
    """
    pairs = (
        list(requested.items())
        if isinstance(requested, Mapping)
        else [(name, name) for name in requested]
    )
    if not pairs:
        raise InvalidNodeError(f"return_nodes is empty for {context}: name at least one node")
    resolved: dict[str, str] = {}
    asked_by: dict[str, str] = {}
    for query, key in pairs:
        if not isinstance(query, str):
            raise InvalidNodeError(
                f"return_nodes entries must be node names (str), got {query!r} for {context}"
            )
        if not isinstance(key, str):
            raise InvalidNodeError(
                f"return_nodes keys must be strings, got {key!r} for node {query!r} of {context}"
            )
        matches = [n for n in available if n == query or n.startswith(query + ".")]
        if not matches:
            # Truncated names ("layer4") are valid too, so they are suggested too.
            prefixes = {n.rsplit(".", i)[0] for n in available for i in range(n.count(".") + 1)}
            suggestions = (
                close_matches(query, sorted(prefixes)) or [n for n in available if query in n][:5]
            )
            hint = f"; close matches: {', '.join(suggestions)}" if suggestions else ""
            raise InvalidNodeError(
                f"unknown node {query!r} in return_nodes for {context}{hint} "
                "(unifeat.get_node_names lists them all)"
            )
        node = query if query in available else matches[-1]
        if node in resolved:
            raise InvalidNodeError(
                f"return_nodes entries {asked_by[node]!r} and {query!r} both name node "
                f"{node!r} of {context}: ask for each node once"
            )
        resolved[node] = key
        asked_by[node] = query
    keys = list(resolved.values())
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise InvalidNodeError(f"return_nodes keys {duplicated} repeat for {context}")
    return resolved


def raw_level(name: str, key: str, shape: Any, size: tuple[int, int]) -> Level:
    """A ``return_nodes`` pick: returned as the node gives it. A map reports its
    channels and reduction; anything else reports reduction 0."""
    found = spatial(shape, size) if isinstance(shape, tuple) else None
    if found is not None:
        channels, reduction_ = found[2], found[1]
    elif isinstance(shape, tuple) and len(shape) > 1 and all(isinstance(s, int) for s in shape):
        channels, reduction_ = int(shape[-1]), 0
    else:
        channels, reduction_ = 0, 0
    return Level(key, channels, reduction_, "raw", where=name, extra={"node": name})


class _Checkpointed(nn.Module):
    """One graph segment, recomputed in backward instead of keeping its activations."""

    def __init__(self, segment: nn.Module) -> None:
        super().__init__()
        self.segment = segment

    def forward(self, *args: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.segment, *args, use_reentrant=False)


def _checkpointed_segments(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` (whose outputs are the levels) cut after each level it returns,
    each segment checkpointed; the segments share ``root``'s modules."""
    from torch.fx.passes.split_module import split_module

    module = fx.GraphModule(root, graph)
    output = next(node for node in module.graph.nodes if node.op == "output")
    returned = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    boundaries = {node for node in returned if isinstance(node, fx.Node)}
    partition, assigned = 0, {}
    for node in module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        assigned[node.name] = partition
        if node in boundaries:
            partition += 1
    split = split_module(module, root, lambda node: assigned[node.name])
    for name, child in list(split.named_children()):
        if name.startswith("submod_"):
            setattr(split, name, _Checkpointed(child))
    return split


def _merged_order(evaluation: Sequence[str], train: Sequence[str]) -> list[str]:
    """Node names of both graphs in depth order: the train graph's order, each
    eval-only node placed after the node it follows in the eval graph."""
    merged = list(dict.fromkeys(train))
    for i, name in enumerate(evaluation):
        if name in merged:
            continue
        before = next((n for n in reversed(evaluation[:i]) if n in merged), None)
        merged.insert(0 if before is None else merged.index(before) + 1, name)
    return merged


# -- the runner ---------------------------------------------------------------------------


def _with_outputs(graph: fx.Graph, names: Mapping[fx.Node, str], wanted: Sequence[str]) -> fx.Graph:
    """A copy of ``graph`` returning the nodes named ``wanted``, with only the nodes
    they need (and the input checks).

    Everything that only fed later levels or the head goes: this is the pruning.
    """
    nodes, outputs = _needed(graph, names, wanted)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
    # No lint: a subset of a valid graph closed under inputs, in its order, is valid.
    new.output(tuple(env[node] for node in outputs))
    return new


def _targets(graph: fx.Graph, names: Mapping[fx.Node, str], wanted: Sequence[str]) -> list[str]:
    """The modules and attributes that computing the nodes named ``wanted`` reads."""
    nodes, _ = _needed(graph, names, wanted)
    return [str(node.target) for node in nodes if node.op in ("call_module", "get_attr")]


# Calls kept even when nothing uses their result: they check inputs.
_SIDE_EFFECTS = {torch._assert, getattr(torch, "_assert_async", torch._assert)}


def _needed(
    graph: fx.Graph, names: Mapping[fx.Node, str], wanted: Sequence[str]
) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes of ``graph`` that the nodes named ``wanted`` depend on, in graph order
    (the inputs, and the input checks with what they read, always), and those nodes.

    What dead-code elimination of a copy returning them would keep, found without
    copying the graph (it needs no owning module: submodules may be gone)."""
    by_name = {name: node for node, name in names.items()}
    outputs = [by_name[name] for name in wanted]
    pending = [
        *outputs,
        *(n for n in graph.nodes if n.op == "call_function" and n.target in _SIDE_EFFECTS),
    ]
    kept: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node not in kept:
            kept.add(node)
            pending.extend(node.all_input_nodes)
    nodes = [n for n in graph.nodes if n in kept or n.op == "placeholder"]
    return nodes, outputs


def _constants_not_persistent(root: nn.Module) -> None:
    """Tensors FX lifted out of the forward's code (``_tensor_constant0``: timm Swin's
    masks) are constants of the graph, not weights: left out of ``state_dict`` so the
    source's own checkpoints load."""
    for name, _ in list(root.named_buffers()):
        owner_path, _, field_ = name.rpartition(".")
        if field_.startswith("_tensor_constant"):
            root.get_submodule(owner_path)._non_persistent_buffers_set.add(field_)


def _share_attribute(destination: nn.Module, source: nn.Module, target: str) -> None:
    """Make ``destination.<target>`` the same object as ``source.<target>``."""
    *path, field_ = target.split(".")
    for part in path:
        if not hasattr(destination, part):
            destination.add_module(part, nn.Module())
        destination, source = getattr(destination, part), getattr(source, part)
    if not hasattr(destination, field_):
        setattr(destination, field_, getattr(source, field_))


def lacks_graph_attributes(trace_: Trace, root: nn.Module) -> bool:
    """Whether ``root`` misses an attribute the traced graph reads (``get_attr``)."""
    for node in trace_.graph.nodes:
        if node.op != "get_attr":
            continue
        owner: Any = root
        for part in str(node.target).split("."):
            if not hasattr(owner, part):
                return True
            owner = getattr(owner, part)
    return False


@dataclass
class GraphPlan:
    """What a graph runner needs, found on the meta device (picklable data)."""

    evaluation: Trace
    levels: tuple[Level, ...]
    final: str
    """The node of the final output while the last level is computed."""
    final_modules: tuple[str, ...] = ()
    """The final norm: modules that map the last level to the final output."""
    tracer_options: dict[str, Any] = field(default_factory=dict)
    train: Trace | None = None
    position_embedding: PositionEmbedding | None = None
    """Where the source keeps a position embedding to resample at other input sizes."""


def _resizable(trace_: Trace | None, plan: GraphPlan) -> None:
    """Graphs of a token model run at any multiple of its patch size (resize.py)."""
    if trace_ is not None and plan.position_embedding is not None:
        make_resizable(trace_.graph, plan.position_embedding)


def _compile(graph: fx.Graph) -> Any:
    """A graph as a plain function ``forward(root, x)``: it reads every module and
    attribute through the root it is given (a ``nn.DataParallel`` replica's own)."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<unifeat graph>", "exec"), namespace)
    return namespace["forward"]


class GraphRunner(Runner):
    """Runs the source's traced graphs, cut after the deepest requested level.

    The root is a ``GraphModule`` of the eval graph holding the source's
    submodules under their own names (so state-dict keys are the source's).
    Where the train graph is another program (aux heads, mode-dependent code,
    an argument such as Swin's ``training=self.training``), it runs as a function
    over the same root in training mode. It is traced when the model is first put
    in training mode, and only where the eval trace read a ``training`` flag: a
    model whose code reads none costs one trace in either mode.
    """

    trims = False  # a cut graph holds only the nodes its outputs need

    def __init__(
        self,
        source: nn.Module,
        plan: GraphPlan,
        *,
        last_level: int,
        context: str,
        keep_final: bool = False,
    ) -> None:
        self._source = source
        """The source's structure, for tracing the train graph later (unregistered;
        its submodules are the root's own objects)."""
        self._plan = plan
        _resizable(plan.evaluation, plan)
        _resizable(plan.train, plan)
        self._context = context
        self.levels = plan.levels
        self.last_level = last_level
        self._keep_final = keep_final
        self._train_differs: bool | None = None
        self._functions: dict[tuple[bool, bool], Any] = {}
        self._checkpointing = False
        self._segmented: dict[tuple[bool, bool], tuple[nn.Module, fx.GraphModule]] = {}
        self.final_norm = final_norm_refusal(bool(plan.final_modules), keep_final)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_functions"] = {}  # compiled on demand again
        state["_segmented"] = {}
        return state

    def set_grad_checkpointing(self, root: nn.Module, enable: bool) -> int:
        """The traced graph is cut after each level into segments, each run under
        :func:`torch.utils.checkpoint.checkpoint` while training (the graph inlines
        the model's modules, so there is no module call to wrap)."""
        self._checkpointing = enable
        self._segmented = {}
        return self.last_level + 1 if enable else 0

    def _segments(self, root: nn.Module, trace_: Trace, final: bool, training: bool) -> Any:
        key = (training, final)
        found = self._segmented.get(key)
        if found is None or found[0] is not root:
            graph = _with_outputs(trace_.graph, trace_.names, self._outputs(trace_, final))
            found = (root, _checkpointed_segments(root, graph))
            self._segmented[key] = found
        return found[1]

    def make_root(self) -> fx.GraphModule:
        """The eval graph up to the deepest level, over the source's submodules, with
        what the final output needs (the final norm) registered too, so that
        ``.to()``, ``state_dict`` and optimizers see it; ``forward`` never runs it."""
        evaluation = self._plan.evaluation
        graph = _with_outputs(evaluation.graph, evaluation.names, self._outputs(evaluation, False))
        root = fx.GraphModule(self._source, graph, class_name=type(self._source).__name__)
        self._share_targets(
            root, _targets(evaluation.graph, evaluation.names, self._outputs(evaluation, True))
        )
        if self._norm_applies():
            for target in self._plan.final_modules:
                _share_attribute(root, self._source, target)
        _constants_not_persistent(root)
        return root

    def _norm_applies(self) -> bool:
        """Whether the final norm still shapes the final output: always while the
        last level is computed; after pruning, where it fits the deepest level's
        width (plain ViT-likes, as timm does)."""
        if not self._keep_final or not self._plan.final_modules:
            return False
        deepest, last = self.levels[self.last_level], self.levels[-1]
        return self.last_level == len(self.levels) - 1 or deepest.num_chs == last.num_chs

    def _share_targets(self, root: nn.Module, targets: Iterable[str]) -> None:
        for target in targets:
            _share_attribute(root, self._source, target)

    def level_module(self, index: int) -> str:
        return self.levels[index].module  # the module whose output the node is, if any

    @property
    def train_trace(self) -> Trace | None:
        return self._plan.train

    # -- graphs ------------------------------------------------------------------------

    def _outputs(self, trace_: Trace, final: bool) -> list[str]:
        available = set(trace_.names.values())
        wanted = [lv.where for lv in self.levels[: self.last_level + 1] if lv.where in available]
        if final:
            name = self._final_name()
            if name in available:
                wanted.append(name)
            elif wanted:
                # The deepest level exists only in the other mode's graph (a train-only
                # node): this graph's final output is its deepest level there.
                wanted.append(wanted[-1])
        return wanted

    def _final_name(self) -> str:
        if self._keep_final and self.last_level == len(self.levels) - 1:
            return self._plan.final
        return self.levels[self.last_level].where

    def _trains_differently(self, root: nn.Module) -> bool:
        if self._train_differs is None:
            if not self._plan.evaluation.mode_dependent:
                # The traced code read no training flag: in train mode it traces to
                # this same graph (unifeat._engine.modes), so nothing is traced.
                self._train_differs = False
                return False
            if self._plan.train is None:
                self._plan.train = trace(
                    self._source,
                    train=True,
                    context=self._context,
                    extra_tracer_kwargs=self._plan.tracer_options,
                )
                self._plan.train.attach_constants(self._source)
                _resizable(self._plan.train, self._plan)
            self._train_differs = not same_program(self._plan.train, self._plan.evaluation)
            if self._train_differs:
                train = self._plan.train
                self._share_targets(
                    root, _targets(train.graph, train.names, self._outputs(train, True))
                )
        return self._train_differs

    def set_mode(self, root: nn.Module, training: bool) -> None:
        if training:
            self._trains_differently(root)

    def _function(self, root: nn.Module, training: bool, final: bool) -> tuple[Any, Trace]:
        """The function to run and the trace it comes from; None runs the root itself."""
        train = training and self._trains_differently(root)
        trace_ = self._plan.train if train else self._plan.evaluation
        assert trace_ is not None
        if not train and not final:
            return None, trace_
        key = (train, final)
        if key not in self._functions:
            self._functions[key] = _compile(
                _with_outputs(trace_.graph, trace_.names, self._outputs(trace_, final))
            )
        return self._functions[key], trace_

    # -- running ---------------------------------------------------------------------------

    def run(
        self,
        root: nn.Module,
        x: Tensor,
        indices: Sequence[int],
        *,
        final: bool,
        norm: bool,
        prefix_tokens: bool,
        context: str,
    ) -> tuple[list[FeatureMap], Tensor | None]:
        training = root.training
        function, trace_ = self._function(root, training, final)
        names = self._outputs(trace_, final)
        if self._checkpointing and training and torch.is_grad_enabled():
            outputs = self._segments(root, trace_, final, training)(x)
        else:
            outputs = root(x) if function is None else function(root, x)
        by_name = dict(zip(names, outputs, strict=True))
        size = (x.shape[-2], x.shape[-1])  # symbolic under torch.export
        maps: list[FeatureMap] = []
        for index in indices:
            level = self.levels[index]
            if level.where not in by_name:
                other = "eval" if training else "train"
                raise InvalidNodeError(
                    f"node {level.where!r} of {context} exists only in the {other} graph, "
                    f"and the model is in {'train' if training else 'eval'} mode: call "
                    f".{other}() first, or return other nodes"
                )
            value = by_name[level.where]
            if norm and level.num_chs == self.levels[-1].num_chs:
                value = self._normed(root, value)
            maps.append(to_map(value, level, size, prefix_tokens=prefix_tokens, context=context))
        if not final:
            return maps, None
        output = outputs[-1]
        pruned = self.last_level < len(self.levels) - 1
        if pruned and self._norm_applies():
            output = self._normed(root, output)
        return maps, output

    def _normed(self, root: nn.Module, value: Tensor) -> Tensor:
        for target in self._plan.final_modules:
            value = root.get_submodule(target)(value)
        return value

    def prune(
        self,
        root: nn.Module,
        last_level: int,
        *,
        drop_final: bool,
        indices: Sequence[int] = (),
    ) -> nn.Module:
        self.last_level = last_level
        if drop_final:
            self._keep_final = False
            self.final_norm = "its final norm was pruned"
        new_root = self.make_root()
        new_root.training = root.training
        if self._train_differs:
            train = self._plan.train
            assert train is not None
            self._share_targets(
                new_root, _targets(train.graph, train.names, self._outputs(train, True))
            )
        self._functions = {}
        self._segmented = {}
        return new_root


# -- the finder ------------------------------------------------------------------------

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    nn.RMSNorm,
)


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: the only kind of module a final norm may be made of."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


class GraphFinder:
    """Traces a model once (eval mode), propagates shapes on the meta device, and
    answers every question a build asks of the graph."""

    def __init__(
        self,
        source: nn.Module,
        *,
        input_size: tuple[int, int, int],
        context: str,
        head_modules: Iterable[str] = (),
        tracer_options: Mapping[str, Any] | None = None,
        position_embedding: PositionEmbedding | None = None,
    ) -> None:
        self.source = source
        self.position_embedding = position_embedding
        self.input_size = input_size
        self.size = input_size[1:]
        self.context = context
        self.head_modules = tuple(head_modules)
        self.tracer_options = dict(tracer_options or {})
        self.evaluation, replica_ = traced(
            source, train=False, context=context, extra_tracer_kwargs=self.tracer_options
        )
        self.shapes = shapes_of(
            source, self.evaluation, input_size, context=context, taken=replica_
        )
        self.graph = _Graph.of(self.evaluation, self.shapes, head_modules=self.head_modules)
        self.train: Trace | None = None

    def node_names(self) -> tuple[list[str], list[str]]:
        """Train and eval node names, as torchvision's ``get_graph_node_names``."""
        train = self._train_trace()
        return list(train.names.values()), list(self.evaluation.names.values())

    def _train_trace(self) -> Trace:
        if not self.evaluation.mode_dependent:
            return self.evaluation  # the same graph in either mode: nothing to trace
        if self.train is None:
            self.train = trace(
                self.source,
                train=True,
                context=self.context,
                extra_tracer_kwargs=self.tracer_options,
            )
        return self.train

    def levels(self) -> list[Level]:
        levels = derive_levels(
            self.graph, (self.size[0], self.size[1]), head_modules=self.head_modules
        )
        if not levels:
            raise UnsupportedOptionError(
                f"no feature levels found in {self.context}: its graph has no spatial maps "
                "or token blocks; pass return_nodes=[...] to choose nodes"
            )
        return levels

    def node_levels(self, return_nodes: Sequence[str] | Mapping[str, str]) -> list[Level]:
        """Levels for ``return_nodes``, in depth order, keyed by the user's keys.

        Names from either graph are accepted (GoogLeNet's auxiliary heads exist
        only in training); each is described by the graph it is in.
        """
        evaluation = list(self.evaluation.names.values())
        train = list(self._train_trace().names.values())
        available = _merged_order(evaluation, train)
        chosen = resolve_return_nodes(return_nodes, available, context=self.context)
        train_shapes: Mapping[fx.Node, Any] = {}
        if any(name not in evaluation for name in chosen):
            train_shapes = self._train_shapes()
        levels = []
        for name in available:
            if name not in chosen:
                continue
            if name in evaluation:
                node = self.evaluation.node(name)
                shape = self.shapes.get(node) if node is not None else None
            else:
                train_node = self._train_trace().node(name)
                shape = train_shapes.get(train_node) if train_node is not None else None
            levels.append(raw_level(name, chosen[name], shape, (self.size[0], self.size[1])))
        order = {name: i for i, name in enumerate(available)}
        return sorted(levels, key=lambda lv: order[lv.where])

    def levels_at_modules(self, levels: Sequence[Level]) -> list[Level]:
        """``levels`` a library names by module (timm's ``feature_info``), read off
        the graph: each at the last node of its module, laid out as that node's
        value is (a map, a channels-last map, or tokens of the level's grid)."""
        available = list(self.evaluation.names.values())
        size = (self.size[0], self.size[1])
        found = []
        for level in levels:
            matches = [n for n in available if n == level.where or n.startswith(f"{level.where}.")]
            if not matches:
                raise UnsupportedOptionError(
                    f"{self.context}'s level {level.module!r} is no module of its FX graph, so "
                    "feature_cls='fx' cannot read it: leave feature_cls out"
                )
            name = level.where if level.where in available else matches[-1]
            node = self.evaluation.node(name)
            shape = self.shapes.get(node) if node is not None else None
            read = spatial(shape, size) if isinstance(shape, tuple) else None
            if read is not None:
                layout = "NHWC" if read[0] == "NHWC" else "NCHW"
                prefix = 0
            elif isinstance(shape, tuple) and len(shape) == 3 and level.reduction > 0:
                cells = (size[0] // level.reduction) * (size[1] // level.reduction)
                grid = token_grid(shape, cells)
                if grid is None:
                    raise UnsupportedOptionError(
                        f"{self.context}'s level {level.module!r} gives {list(shape)} tokens, no "
                        f"grid of its reduction {level.reduction}: feature_cls='fx' cannot "
                        "read it; leave feature_cls out"
                    )
                layout, prefix = "tokens", grid
            else:
                raise UnsupportedOptionError(
                    f"{self.context}'s level {level.module!r} is no map or tokens in its FX "
                    f"graph ({shape}): feature_cls='fx' cannot read it; leave feature_cls out"
                )
            found.append(
                dataclasses.replace(
                    level,
                    layout=layout,  # type: ignore[arg-type]
                    where=name,
                    num_prefix_tokens=prefix,
                    extra={**level.extra, "node": name},
                )
            )
        return found

    def _train_shapes(self) -> Mapping[fx.Node, Any]:
        train = self._train_trace()
        channels, height, width = self.input_size
        example = torch.empty(2, channels, height, width, device="meta")
        try:
            return propagate_shapes(
                self.source, train, example, fake=not _is_meta(self.source), eval_mode=False
            )
        except Exception:
            return {}

    def shapes_by_name(self) -> dict[str, Any]:
        """Every named node's output shape, by node name: what a level's ``where``
        names."""
        names = self.evaluation.names
        return {names[node]: shape for node, shape in self.shapes.items() if node in names}

    def remeasure(self, variant: nn.Module, *, retrace: bool) -> dict[str, Any]:
        """Shapes by node name of another build of the same architecture (dilated)."""
        evaluation = (
            trace(
                variant, train=False, context=self.context, extra_tracer_kwargs=self.tracer_options
            )
            if retrace
            else self.evaluation
        )
        shapes = shapes_of(variant, evaluation, self.input_size, context=self.context)
        return {
            evaluation.names[node]: shape
            for node, shape in shapes.items()
            if node in evaluation.names
        }

    def spatial_ops(self, root: nn.Module) -> list[tuple[str, nn.Module, int]]:
        """The convs and pools in execution order with their input reductions (what
        :func:`unifeat._engine.dilation.plan_dilation` needs)."""
        found: list[tuple[str, nn.Module, int]] = []
        for node in self.evaluation.graph.nodes:
            if node.op != "call_module" or not node.all_input_nodes:
                continue
            shape = self.shapes.get(node.all_input_nodes[0])
            layout = (
                spatial(shape, (self.size[0], self.size[1])) if isinstance(shape, tuple) else None
            )
            if layout is None:
                continue
            reduction_in = layout[1]
            target = str(node.target)
            module = root.get_submodule(target)
            # Leaf modules (torchvision.ops' Conv2dNormActivation, ...) hide their
            # convs from the graph; they run them in registration order.
            inner = (
                [(target, module)]
                if isinstance(module, SPATIAL_OPS)
                else [
                    (f"{target}.{name}", m)
                    for name, m in module.named_modules()
                    if name and isinstance(m, SPATIAL_OPS)
                ]
            )
            for name, op in inner:
                found.append((name, op, reduction_in))
                stride = op.stride if op.stride is not None else 1
                reduction_in *= stride if isinstance(stride, int) else int(stride[0])
        return found

    def plan(self, levels: Sequence[Level]) -> GraphPlan:
        """The runner's data for ``levels`` (the final output and norm included)."""
        auto = all(level.layout != "raw" for level in levels)
        final = final_node(self.graph, levels[-1]) if auto else levels[-1].where
        return GraphPlan(
            evaluation=self.evaluation,
            levels=tuple(levels),
            final=final,
            final_modules=self._final_norm(levels[-1].where, final) if auto else (),
            tracer_options=self.tracer_options,
            train=self.train,
            position_embedding=self.position_embedding,
        )

    def _final_norm(self, deepest: str, final: str) -> tuple[str, ...]:
        """The norm modules between the deepest level and the final output, where the
        one is a plain chain of norms applied to the other."""
        node = self.evaluation.node(final)
        chain: list[str] = []
        while node is not None and self.evaluation.names.get(node) != deepest:
            if node.op != "call_module" or len(node.all_input_nodes) != 1:
                return ()
            if not is_norm(self.source.get_submodule(str(node.target))):
                return ()
            chain.append(str(node.target))
            node = node.all_input_nodes[0]
        return tuple(reversed(chain)) if node is not None else ()
