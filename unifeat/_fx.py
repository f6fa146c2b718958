"""FX helpers shared by every backend that cuts features out of a traced graph.

One trace per mode with torchvision's own tracer (its leaf-module and
node-naming conventions), one shape propagation on the meta device, and from
those: node names (SPEC §5), the automatic level list (SPEC §2), and a graph
module that computes only what the requested levels need.

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
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.feature_extraction import NodePathTracer

from unifeat._dilation import SPATIAL_OPS
from unifeat._errors import InvalidNodeError, TracingError, close_matches
from unifeat._feature_info import FeatureInfo
from unifeat._feature_model import FeatureMap, MapsFeatureModel
from unifeat._maps import spatial as spatial_layout

# Top-level modules that belong to a classifier head, never to a feature level:
# pooling, the final norm and layout change of Swin-likes, logits.
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
        "norm",
        "permute",
        "pre_logits",
        "last_linear",
        "logits",
    }
)
# Functions called by the root module's forward that start its head.
HEAD_FUNCTIONS = frozenset({"adaptive_avg_pool2d", "adaptive_max_pool2d", "flatten", "mean"})


def tracer_kwargs(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """torchvision's tracer defaults, plus timm's "do not trace" registrations.

    Same leaf modules and auto-wrapped modules as torchvision's own
    ``get_graph_node_names``, so node names come out identical to its.
    """
    from torchvision.models import feature_extraction

    result = dict(extra or {})
    result["autowrap_modules"] = tuple(
        set(result.get("autowrap_modules", ())) | {math, torchvision.ops}
    )
    modules, functions = _timm_notrace()
    leaves = [*result.get("leaf_modules", ()), *feature_extraction._get_leaf_modules_for_ops()]
    result["leaf_modules"] = list(dict.fromkeys([*leaves, *modules]))
    if functions:
        wrapped = [*result.get("autowrap_functions", ()), *functions]
        result["autowrap_functions"] = tuple(dict.fromkeys(wrapped))
    return result


def _timm_notrace() -> tuple[list[type], list[Any]]:
    """The modules and functions timm registers as not traceable, where timm is loaded."""
    import sys

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

    def __deepcopy__(self, memo: dict[int, Any]) -> Trace:
        # fx.Graph deep-copies its nodes without the memo, so the name map is
        # rebuilt on the copied nodes (by their unique graph names).
        graph = copy.deepcopy(self.graph, memo)
        copied = {node.name: node for node in graph.nodes}
        return Trace(graph, {copied[node.name]: name for node, name in self.names.items()})


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


def trace(
    module: nn.Module,
    *,
    train: bool,
    context: str,
    extra_tracer_kwargs: Mapping[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> Trace:
    """Trace ``module`` in train or eval mode, restoring its mode whatever happens."""
    was_training = module.training
    tracer = _FastNodePathTracer(**tracer_kwargs(extra_tracer_kwargs))
    try:
        module.train(train)
        graph = tracer.trace(module, concrete_args=concrete_args)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TracingError(
            f"FX could not trace {context} ({'train' if train else 'eval'} mode): "
            f"{type(exc).__name__}: {first_line}. Ways out: build it through its own "
            "backend (backend='timm', ...), or make the failing submodule a leaf with "
            "tracer_kwargs={'leaf_modules': [...]}"
        ) from exc
    finally:
        module.train(was_training)
    return Trace(graph, dict(tracer.node_to_qualname))


def node_names(
    module: nn.Module, *, context: str, **trace_kwargs: Any
) -> tuple[list[str], list[str]]:
    """Train and eval node names, as ``torchvision``'s ``get_graph_node_names``."""
    train = trace(module, train=True, context=context, **trace_kwargs)
    evaluation = trace(module, train=False, context=context, **trace_kwargs)
    return list(train.names.values()), list(evaluation.names.values())


# -- shapes and levels --------------------------------------------------------------


@dataclass(frozen=True)
class NodeLevel:
    """Where a level comes from in the graph, and how to turn it into an NCHW map."""

    node: str
    module: str
    num_chs: int
    reduction: int
    layout: str  # "NCHW", "NHWC" or "tokens"
    num_prefix_tokens: int = 0


_MAX_PREFIX_TOKENS = 32


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


def _is_activation(node: fx.Node) -> bool:
    return node.op not in ("get_attr", "output")


def derive_levels(
    graph: fx.Graph,
    names: Mapping[fx.Node, str],
    shapes: Mapping[fx.Node, Sequence[int]],
    input_size: tuple[int, int],
    *,
    head_modules: Iterable[str] = (),
) -> list[NodeLevel]:
    """The automatic level list of a traced model (see the module docstring)."""
    # Only tensors computed from the input are activations: parameter-only
    # subgraphs (e.g. Swin V2's position-bias MLP) never break a stage boundary.
    from_input: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in from_input for a in node.all_input_nodes):
            from_input.add(node)
    order = [n for n in graph.nodes if _is_activation(n) and n in from_input]
    position = {n: i for i, n in enumerate(order)}
    head = set(HEAD_MODULES) | set(head_modules)

    def in_head(node: fx.Node) -> bool:
        path = module_path(node, names)
        if path:
            return any(_inside(path, h) for h in head)
        return names.get(node, "").rstrip("_0123456789") in HEAD_FUNCTIONS

    # Cut points: no earlier activation is still needed after this node.
    last_use = {
        n: max((position[u] for u in n.users if u in position), default=position[n]) for n in order
    }
    cut: set[fx.Node] = set()
    alive_until = -1
    for i, node in enumerate(order):
        if node.op != "placeholder" and alive_until <= i:
            cut.add(node)
        alive_until = max(alive_until, last_use[node])

    body = []
    for node in order:
        if node.op == "placeholder":
            continue
        if in_head(node):
            break
        body.append(node)

    tokens = _token_levels(body, names, shapes, input_size, cut)
    if tokens:
        return tokens

    info: dict[fx.Node, tuple[str, int, int]] = {}
    for node in body:
        shape = shapes.get(node)
        spatial = spatial_layout(shape, input_size) if shape is not None else None
        if spatial is not None:
            info[node] = spatial
    reductions = sorted({r for _, r, _ in info.values()})
    levels: list[NodeLevel] = []
    previous: fx.Node | None = None
    for r in reductions:
        at_r = [n for n in body if n in info and info[n][1] == r]
        above = next(
            (n for n in body if n in info and info[n][1] > r and position[n] > position[at_r[0]]),
            None,
        )
        chosen = _stage_output(above, r, names, info, cut, position) if above else None
        if chosen is None:
            before = [n for n in at_r if above is None or position[n] < position[above]]
            cut_before = [n for n in before if n in cut]
            chosen = (cut_before or before or at_r)[-1]
        layout, reduction, channels = info[chosen]
        label = _module_of_output(chosen, names, order, previous)
        levels.append(NodeLevel(names[chosen], label, channels, reduction, layout))
        previous = chosen
    return levels


def _stage_output(
    above: fx.Node,
    r: int,
    names: Mapping[fx.Node, str],
    info: Mapping[fx.Node, tuple[str, int, int]],
    cut: set[fx.Node],
    position: Mapping[fx.Node, int],
) -> fx.Node | None:
    graph_nodes = [n for n in position]
    chosen = None
    for ancestor in _ancestors(module_path(above, names)):
        inside = [n for n in graph_nodes if _inside(module_path(n, names), ancestor)]
        external = {
            arg
            for n in inside
            for arg in n.all_input_nodes
            if arg in position and not _inside(module_path(arg, names), ancestor)
        }
        if len(external) != 1:
            break
        (source,) = external
        if source not in cut or source not in info or info[source][1] != r:
            break
        chosen = source
    return chosen


def _module_of_output(
    node: fx.Node,
    names: Mapping[fx.Node, str],
    order: list[fx.Node],
    after: fx.Node | None = None,
) -> str:
    """The shallowest module whose output ``node`` is (its last node), else the node name.

    A module that also ran before ``after`` (the previous level) would name
    several levels ("features"), so the label stops below it ("features.7").
    """
    path = module_path(node, names)
    best = names[node]
    start = order.index(after) + 1 if after is not None and after in order else 0
    for ancestor in _ancestors(path):
        members = [i for i, n in enumerate(order) if _inside(module_path(n, names), ancestor)]
        if not members or order[members[-1]] is not node or members[0] < start:
            break
        best = ancestor
    return best


def _is_tokens(shape: Sequence[int], cells: int) -> bool:
    """``[N, prefix + cells, C]``: patch tokens plus a few class/register tokens."""
    return 0 <= shape[1] - cells <= _MAX_PREFIX_TOKENS


def _token_levels(
    body: list[fx.Node],
    names: Mapping[fx.Node, str],
    shapes: Mapping[fx.Node, Sequence[int]],
    input_size: tuple[int, int],
    cut: set[fx.Node],
) -> list[NodeLevel]:
    """One level per block for ViT-style models whose body runs on ``[N, L, C]`` tokens."""
    grid = None
    for node in body:
        shape = shapes.get(node)
        if shape is None:
            continue
        spatial = spatial_layout(shape, input_size)
        if spatial is not None and spatial[0] == "NCHW":
            grid = (shape[2] * shape[3], spatial[1])
        elif len(shape) == 3 and grid is not None and _is_tokens(shape, grid[0]):
            break
    else:
        return []
    if grid is None:
        return []
    cells, reduction = grid
    token_outputs = [
        n for n in body if n in cut and len(shapes.get(n, ())) == 3 and _is_tokens(shapes[n], cells)
    ]
    # Blocks: the children of one container that each end at a token cut point.
    token_cuts = set(token_outputs)
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
    position = {n: i for i, n in enumerate(body)}
    blocks.sort(key=lambda block: position[block[1]])
    return [
        NodeLevel(
            names[node],
            block,
            int(shapes[node][2]),
            reduction,
            "tokens",
            int(shapes[node][1]) - cells,
        )
        for block, node in blocks
    ]


def propagate_shapes(
    graph_module: fx.GraphModule, example: Tensor, *, fake: bool = False
) -> dict[fx.Node, Sequence[int]]:
    """Record every node's output shape without computing anything.

    Meta tensors for models built on the meta device; ``fake=True`` for a real
    module, whose weights are then stood in for by fake tensors, not copied.
    """
    if fake:
        try:
            _propagate_with_meta_stand_ins(graph_module, example)
        except Exception:
            # Tensors the forward makes on the CPU (Swin V2's position grids)
            # do not mix with meta ones; fake tensors take them in.
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            ShapeProp(graph_module, fake_mode=mode).propagate(mode.from_tensor(example))
    else:
        _MetaShapeProp(graph_module).propagate(example)
    shapes: dict[fx.Node, Sequence[int]] = {}
    for node in graph_module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node] = tuple(meta.shape)
    return shapes


class _MetaShapeProp(ShapeProp):
    """Shape propagation with a shortcut for attention whose weights are not asked
    for: its output has the query's shape. Running ``nn.MultiheadAttention`` op by op
    on the meta device was half of ``feature_info("tv:vit_h_14")``."""

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


def _propagate_with_meta_stand_ins(graph_module: fx.GraphModule, example: Tensor) -> None:
    """Shape propagation over a real module with meta tensors swapped in for its
    weights for the duration: nothing is computed or copied (a fake-tensor copy of
    ResNet-50's weights cost 3x the whole rest of the build)."""
    from torch.nn.utils.stateless import _reparametrize_module

    named = [
        *graph_module.named_parameters(remove_duplicate=False),
        *graph_module.named_buffers(remove_duplicate=False),
    ]
    stand_ins = {name: torch.empty_like(tensor, device="meta") for name, tensor in named}
    with _reparametrize_module(graph_module, stand_ins), torch.no_grad():
        _MetaShapeProp(graph_module).propagate(example.to("meta"))


# -- return_nodes ------------------------------------------------------------------


def resolve_return_nodes(
    requested: Sequence[str] | Mapping[str, str], available: Sequence[str], *, context: str
) -> dict[str, str]:
    """Map each requested (full or truncated) node name to one node: ``{node: key}``.

    A truncated name (``"layer4"``) means the last node inside that module, as in
    torchvision. Unknown names, and two requests naming one node, raise
    :class:`InvalidNodeError` with close matches.
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
            raise InvalidNodeError(f"return_nodes entries must be node names, got {query!r}")
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
        resolved[node] = str(key)
        asked_by[node] = query
    keys = list(resolved.values())
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise InvalidNodeError(f"return_nodes keys {duplicated} repeat for {context}")
    return resolved


def relevel(
    levels: Sequence[NodeLevel],
    evaluation: Trace,
    shapes: Mapping[fx.Node, Sequence[int]],
    input_size: tuple[int, int],
) -> list[NodeLevel]:
    """The same level nodes in another build of the architecture (e.g. dilated)."""
    by_name = {name: node for node, name in evaluation.names.items()}
    result = []
    for level in levels:
        spatial = spatial_layout(shapes[by_name[level.node]], input_size)
        reduction = spatial[1] if spatial else level.reduction
        result.append(
            NodeLevel(
                level.node,
                level.module,
                level.num_chs,
                reduction,
                level.layout,
                level.num_prefix_tokens,
            )
        )
    return result


def node_levels(
    evaluation: Trace,
    shapes: Mapping[fx.Node, Sequence[int]],
    return_nodes: Sequence[str] | Mapping[str, str],
    input_size: tuple[int, int],
    *,
    context: str,
) -> list[NodeLevel]:
    """Levels for explicit ``return_nodes``, in depth order, keyed by the user's keys."""
    available = list(evaluation.names.values())
    chosen = resolve_return_nodes(return_nodes, available, context=context)
    levels = []
    for node, name in evaluation.names.items():
        if name not in chosen:
            continue
        shape = shapes.get(node)
        if shape is None:
            raise InvalidNodeError(
                f"node {name!r} of {context} does not produce a tensor; choose a tensor node"
            )
        spatial = spatial_layout(shape, input_size)
        channels = spatial[2] if spatial else (int(shape[-1]) if len(shape) > 1 else 1)
        reduction = spatial[1] if spatial else 0
        levels.append(NodeLevel(name, chosen[name], channels, reduction, "raw"))
    return levels


# -- the feature model -------------------------------------------------------------


def _with_outputs(graph: fx.Graph, names: Mapping[fx.Node, str], wanted: Sequence[str]) -> fx.Graph:
    """A copy of ``graph`` returning the nodes named ``wanted``; dead code is dropped.

    Everything that only fed later levels or the head goes: this is the pruning.
    """
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        env[node] = new.node_copy(node, lambda n: env[n])
        if node in names:
            by_name[names[node]] = env[node]
    new.output(tuple(by_name[name] for name in wanted))
    _drop_unused(new)
    new.lint()
    return new


# Calls kept even when nothing uses their result: they check inputs.
_SIDE_EFFECTS = {torch._assert, getattr(torch, "_assert_async", torch._assert)}


def _drop_unused(graph: fx.Graph) -> None:
    """Dead-code elimination that needs no owning module (submodules may be gone)."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and node.target in _SIDE_EFFECTS:
            continue
        graph.erase_node(node)


def _to_map(tensor: Tensor, level: NodeLevel, grid: tuple[int, int]) -> Tensor:
    if level.layout == "NHWC":
        return tensor.permute(0, 3, 1, 2)
    if level.layout == "raw":
        return tensor
    if level.layout == "tokens":
        patches = tensor[:, level.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], *grid)
    return tensor


def _share_attribute(destination: nn.Module, source: nn.Module, target: str) -> None:
    """Make ``destination.<target>`` the same object as ``source.<target>``."""
    *path, field = target.split(".")
    for part in path:
        if not hasattr(destination, part):
            destination.add_module(part, nn.Module())
        destination, source = getattr(destination, part), getattr(source, part)
    if not hasattr(destination, field):
        setattr(destination, field, getattr(source, field))


class FxFeatureModel(MapsFeatureModel):
    """Feature model over traced graphs that end at the deepest requested level.

    ``self.model`` is a ``GraphModule`` of the eval graph holding the source's
    submodules under their own names (so state-dict keys are the source's).
    Where the train graph differs (aux heads, mode-dependent code), a second
    ``GraphModule`` over the same submodules runs in training mode; it is not
    registered, so nothing is counted twice. Unlike torchvision's
    ``DualGraphModule``, this survives ``copy.deepcopy`` with every mode flag.

    The train graph is traced when the model is first put in training mode
    (at once if the source is in training mode): a model built for inference
    costs one trace, not two.
    """

    _train_runner: fx.GraphModule | None
    _source: nn.Module
    _no_norm = "FX feature models return graph nodes as they are"

    def __init__(
        self,
        source: nn.Module,
        traces: tuple[Trace | None, Trace],
        levels: Sequence[NodeLevel],
        feature_info: FeatureInfo,
        *,
        backend: str,
        output_type: str,
        output_fmt: str,
        return_prefix_tokens: bool,
        context: str,
    ) -> None:
        levels = tuple(levels)
        source_keys = tuple(source.state_dict().keys())
        inner = _eval_module(source, traces[1], levels, max(feature_info.out_indices))
        super().__init__(
            inner,
            feature_info=feature_info,
            backend=backend,
            output_type=output_type,
            output_fmt=output_fmt,
            return_prefix_tokens=return_prefix_tokens,
            context=context,
            source_keys=source_keys,
        )
        self._traces = traces
        self._levels = levels
        # The source's structure, for tracing the train graph later; unregistered,
        # and its submodules and parameters are self.model's own objects.
        object.__setattr__(self, "_source", source)
        self._set_train_runner(None)
        self.training = inner.training = source.training
        if source.training:
            self._prepare_train_graph()
        self._after_prune()

    def _set_train_runner(self, runner: fx.GraphModule | None) -> None:
        # Kept out of the module tree: its submodules are self.model's.
        object.__setattr__(self, "_train_runner", runner)

    def _prepare_train_graph(self) -> None:
        """Trace the train graph if not done yet, and run it where it differs."""
        train, evaluation = self._traces
        if train is None:
            train = trace(self._source, train=True, context=self._context)
            self._traces = (train, evaluation)
        if list(train.names.values()) == list(evaluation.names.values()):
            self._set_train_runner(None)
            return
        wanted = [level.node for level in self._levels[: self.last_level + 1]]
        train_graph = _with_outputs(train.graph, train.names, wanted)
        for node in train_graph.nodes:
            if node.op in ("call_module", "get_attr"):
                _share_attribute(self.model, self._source, str(node.target))
        class_name = type(self._source).__name__
        self._set_train_runner(fx.GraphModule(self.model, train_graph, class_name=class_name))

    def train(self, mode: bool = True) -> FxFeatureModel:
        super().train(mode)
        if mode:
            self._prepare_train_graph()
        return self

    def _maps(self, x: Tensor, indices: Sequence[int]) -> list[FeatureMap]:
        runner: nn.Module = (
            self._train_runner if self.training and self._train_runner else self.model
        )
        outputs = runner(x)
        maps: list[FeatureMap] = []
        for index in indices:
            level, tensor = self._levels[index], outputs[index]
            if level.layout != "tokens":
                maps.append(_to_map(tensor, level, (0, 0)))
                continue
            grid = (x.shape[-2] // level.reduction, x.shape[-1] // level.reduction)
            spatial = _to_map(tensor, level, grid)
            if self.return_prefix_tokens:
                maps.append((spatial, tensor[:, : level.num_prefix_tokens]))
            else:
                maps.append(spatial)
        return maps

    def prune_intermediate_layers(
        self, indices: int | Sequence[int], prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Rebuild the graphs to end at the deepest of ``indices``; returns them normalized."""
        chosen = self.resolve_indices(indices)
        inner = _eval_module(self._source, self._traces[1], self._levels, max(chosen))
        inner.training = self.model.training
        self.model = inner
        self.feature_info = self.feature_info.from_other(chosen)
        self.last_level = max(chosen)
        self._set_train_runner(None)
        if self._traces[0] is not None:
            self._prepare_train_graph()
        self._after_prune()
        return list(chosen)


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


def _eval_module(
    root: nn.Module, evaluation: Trace, levels: Sequence[NodeLevel], last_level: int
) -> fx.GraphModule:
    """The eval graph cut after ``last_level``, over ``root``'s submodules."""
    wanted = [level.node for level in levels[: last_level + 1]]
    graph = _with_outputs(evaluation.graph, evaluation.names, wanted)
    return fx.GraphModule(root, graph, class_name=type(root).__name__)


def level_dicts(levels: Sequence[NodeLevel]) -> list[dict[str, Any]]:
    """Levels as FeatureInfo dicts (the graph node is kept as metadata).

    A ``reduction`` of 0 marks a requested node that is not a spatial map.
    """
    return [
        dict(num_chs=lv.num_chs, reduction=lv.reduction, module=lv.module, node=lv.node)
        for lv in levels
    ]


def spatial_ops(
    trace_: Trace,
    shapes: Mapping[fx.Node, Sequence[int]],
    root: nn.Module,
    input_size: tuple[int, int],
) -> list[tuple[str, nn.Module, int]]:
    """The convs and pools of the graph in execution order, with their input reductions
    (what :func:`unifeat._dilation.plan_dilation` needs)."""
    found: list[tuple[str, nn.Module, int]] = []
    for node in trace_.graph.nodes:
        if node.op != "call_module" or not node.all_input_nodes:
            continue
        layout = spatial_layout(shapes.get(node.all_input_nodes[0], ()), input_size)
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
