"""The generic backend: any ``nn.Module`` passed in.

Levels come from its traced FX graph; a module FX cannot trace (data-dependent
control flow) is served by hooks on its block list instead. Input size and
channel count are the module's own where it says (its first convolution),
``input_size=`` otherwise. Its classifier head, for timm's classifier interface,
is read off the same graph where it is unambiguous (:func:`head_of_graph`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from unifeat._backends._base import Adapter
from unifeat._engine.classifier import FLATTEN, HeadRecipe
from unifeat._engine.graph import GraphPlan, Trace
from unifeat._errors import UnsupportedOptionError
from unifeat._options import BuildPlan

_SPATIAL = ((2, 3), (-2, -1), (3, 2), (-1, -2))


class FxAdapter(Adapter):
    name = "fx"

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        first = next((m for m in source.modules() if isinstance(m, nn.Conv2d)), None)
        return (first.in_channels if first is not None else 3, 224, 224)

    def head_recipe(self, plan: BuildPlan, source: nn.Module) -> HeadRecipe | None:
        """The head of a module whose traced forward ends in global pooling and one
        ``nn.Linear`` (:func:`head_of_graph`); anything else is refused with the reason."""
        features = plan.model_copy(
            update={
                "features_only": True,
                "out_indices": (-1,),
                "num_classes": None,
                "global_pool": None,
                "checkpoint_path": None,
            }
        )
        layout = self.layout(features)
        if not isinstance(layout.plan, GraphPlan):
            raise UnsupportedOptionError(
                f"{plan.label} does not trace with FX (its levels come from hooks), so "
                "unifeat cannot read its classifier head off a graph; features_only=True "
                "gives its features"
            )
        channels = layout.info.channels()[-1]
        recipe = head_of_graph(
            source, layout.plan.evaluation, layout.plan.final, channels, context=plan.label
        )
        if layout.plan.train is not None:
            in_training = head_of_graph(
                source, layout.plan.train, layout.plan.final, channels, context=plan.label
            )
            if in_training != recipe:
                raise UnsupportedOptionError(
                    f"the head of {plan.label} differs between its train and eval graphs, "
                    "so unifeat cannot tell which one timm's interface should reset"
                )
        return recipe


def _refuse(context: str, why: str) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        f"unifeat cannot find the classifier head of {context} in its traced graph: {why}. "
        "It knows a head whose forward ends in one nn.Linear module call on the deepest "
        "level's output through global pooling (nn.AdaptiveAvgPool2d/MaxPool2d(1), "
        "F.adaptive_avg_pool2d(x, 1), .mean((2, 3))), flatten, nn.Dropout or "
        "nn.Identity only; features_only=True gives this model's features"
    )


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return f"{node.op} {name!r} (node {node.name!r})"


def _is_one(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _dims(node: fx.Node) -> Any:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return tuple(dims) if isinstance(dims, (list, tuple)) else dims


def _step(source: nn.Module, node: fx.Node) -> tuple[str, str] | None:
    """What one node between the deepest level and the classifier is: ("pool", how),
    ("flatten", step), ("drop", path), ("skip", ""); None: something else."""
    if node.op == "call_module":
        path = str(node.target)
        module = source.get_submodule(path)
        if isinstance(module, nn.AdaptiveAvgPool2d) and _is_one(module.output_size):
            return "pool", f"avg:{path}"
        if isinstance(module, nn.AdaptiveMaxPool2d) and _is_one(module.output_size):
            return "pool", f"max:{path}"
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return "flatten", path
        if isinstance(module, nn.Dropout):
            return "drop", path
        if isinstance(module, nn.Identity):
            return "skip", ""
        return None
    function = node.target
    if (node.op == "call_method" and function == "mean") or function is torch.mean:
        if _dims(node) in _SPATIAL and not node.kwargs.get("dtype"):
            return "pool", "avg:"
        return None
    if (node.op == "call_method" and function == "flatten") or function is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return ("flatten", FLATTEN) if start == 1 and end == -1 else None
    if function in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if _is_one(size):
            kind = "avg" if function is F.adaptive_avg_pool2d else "max"
            return "pool", f"{kind}:function:{function.__name__}"
        return None
    return None


def head_of_graph(
    source: nn.Module, trace_: Trace, final: str, channels: int, *, context: str
) -> HeadRecipe:
    """The head of a traced module: its graph's output is an ``nn.Linear`` module call
    whose input is the final output (node ``final``) through exactly one global pool
    and only flatten, dropout and identity steps, each value used once."""
    output = next(n for n in trace_.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise _refuse(context, "its forward returns a tuple or a container, not one tensor")
    module = source.get_submodule(str(result.target)) if result.op == "call_module" else None
    if not isinstance(module, nn.Linear):
        raise _refuse(context, f"its output is {_describe(result)}, not an nn.Linear module")
    steps: list[tuple[str, str]] = []
    node = result
    while True:
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            raise _refuse(context, f"{_describe(node)} reads {len(inputs)} values, not one")
        node = inputs[0]
        if trace_.names.get(node) == final:
            break
        if node.op == "placeholder":
            raise _refuse(context, "the classifier's input does not come from the last level")
        step = _step(source, node)
        if step is None:
            raise _refuse(context, f"{_describe(node)} lies between the last level and the head")
        if len(node.users) != 1:
            raise _refuse(context, f"the value of {_describe(node)} is used elsewhere too")
        steps.append(step)
    steps.reverse()
    pools = [i for i, (kind, _) in enumerate(steps) if kind == "pool"]
    if len(pools) != 1:
        raise _refuse(context, f"{len(pools)} global pools between the last level and the head")
    if any(kind != "skip" for kind, _ in steps[: pools[0]]):
        raise _refuse(context, "something other than the global pool comes first")
    if int(module.in_features) != channels:
        raise _refuse(
            context,
            f"its nn.Linear takes {module.in_features} features, the last level has {channels}",
        )
    pool, _, where = steps[pools[0]][1].partition(":")
    after = steps[pools[0] + 1 :]
    function = where.removeprefix("function:") if where.startswith("function:") else None
    return HeadRecipe(
        "map",
        str(result.target),
        num_features=channels,
        head_hidden_size=int(module.in_features),
        num_classes=int(module.out_features),
        default_pool=pool,
        pool_module=(where or None) if function is None else None,
        pool_function=function,
        pre_logits=tuple(path for kind, path in after if kind == "flatten"),
        drop=tuple(path for kind, path in after if kind == "drop"),
    )
