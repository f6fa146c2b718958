"""Token models at any input size: learned position embeddings resampled to the grid.

A ViT keeps one position embedding per patch of the grid it was built for. At
another input size (a multiple of the patch size: ``FeatureModel.check_input``
refuses the rest) the embedding of the patch grid is resampled to the input's
grid, bicubic, the prefix (class token) embeddings kept as they are. At the
built size the embedding is used untouched, so outputs are bit-identical to the
library's own. Each library's own resampling rule is kept (zoo knowledge an
adapter hands over as a :class:`PositionEmbedding`):

* torchvision (``interpolate_embeddings``): bicubic, ``align_corners=True``;
* open_clip (``resize_pos_embed``), timm (``resample_abs_pos_embed``):
  bicubic, ``antialias=True``, ``align_corners=False``.

The resampled embedding is computed on each call, from the model's parameter,
which is never written: feature models stay safe to call from several threads,
and gradients reach the parameter through the interpolation.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


@dataclass(frozen=True)
class PositionEmbedding:
    """Where a token model keeps a learned position embedding of a fixed grid."""

    target: str
    """Its attribute path in the source (``"encoder.pos_embedding"``)."""
    patch: int
    grid: tuple[int, int]
    """The patch grid it was built for (rows, columns)."""
    prefix: int = 1
    """Embeddings before the grid's (the class token's), kept as they are."""
    align_corners: bool = False
    antialias: bool = True


def resample(position: Tensor, rows: int, cols: int, spec: PositionEmbedding) -> Tensor:
    """``position`` (``[1, prefix + R*C, D]`` or ``[prefix + R*C, D]``) for a
    ``rows`` x ``cols`` grid; itself where that is the built grid."""
    if statically_known_true(rows == spec.grid[0]) and statically_known_true(cols == spec.grid[1]):
        return position
    batched = position.dim() == 3
    table = position if batched else position.unsqueeze(0)
    prefix, grid = table[:, : spec.prefix], table[:, spec.prefix :]
    channels = grid.shape[-1]
    image = grid.reshape(1, spec.grid[0], spec.grid[1], channels).permute(0, 3, 1, 2)
    # Interpolated in float32 (a half-precision model's table too), as timm does.
    resized = F.interpolate(
        image.float(),
        size=(rows, cols),
        mode="bicubic",
        align_corners=spec.align_corners,
        antialias=spec.antialias,
    ).to(table.dtype)
    grid = resized.permute(0, 2, 3, 1).reshape(1, -1, channels)
    out = torch.cat([prefix, grid], dim=1)
    return out if batched else out[0]


def resampled_for(
    position: Tensor,
    x: Tensor,
    patch: int,
    grid: tuple[int, int],
    prefix: int,
    align_corners: bool,
    antialias: bool,
) -> Tensor:
    """``position`` for the patch grid of the input ``x`` (``[N, C, H, W]``); the
    rule's fields one by one, as a traced graph's call passes constants."""
    if isinstance(x, fx.Proxy):  # traced again (a GraphModule unpickled): one node
        args = (position, x, patch, grid, prefix, align_corners, antialias)
        return x.tracer.create_proxy("call_function", resampled_for, args, {})
    spec = PositionEmbedding("", patch, grid, prefix, align_corners, antialias)
    return resample(position, x.shape[-2] // patch, x.shape[-1] // patch, spec)


def _skip_size_check(condition: object, message: object) -> None:
    """What an input-size assert of a resizable graph becomes: a check the feature
    model makes before the graph runs (any multiple of the patch size)."""


def _reads_input_size(node: object, placeholder: fx.Node) -> bool:
    """``x.shape[2]`` or ``x.shape[3]`` of the graph's input."""
    if not isinstance(node, fx.Node) or node.target is not operator.getitem:
        return False
    shape, index = node.args
    return (
        isinstance(shape, fx.Node)
        and shape.target is getattr
        and shape.args == (placeholder, "shape")
        and index in (2, 3, -1, -2)
    )


def make_resizable(graph: fx.Graph, spec: PositionEmbedding) -> bool:
    """Rewrite a traced graph in place to run at any multiple of the patch size:
    its asserts that the input's height and width are the built ones become
    no-ops, and every read of the position embedding goes through
    :func:`resampled_for`. False (graph unchanged) where the graph does not read
    ``spec.target``."""
    placeholder = next((n for n in graph.nodes if n.op == "placeholder"), None)
    reads = [n for n in graph.nodes if n.op == "get_attr" and n.target == spec.target]
    if placeholder is None or not reads:
        return False
    if any(user.target is resampled_for for read in reads for user in read.users):
        return True  # rewritten already
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch._assert:
            continue
        condition = node.args[0] if node.args else None
        if (
            isinstance(condition, fx.Node)
            and condition.target is operator.eq
            and any(_reads_input_size(arg, placeholder) for arg in condition.args)
        ):
            node.target = _skip_size_check
    for read in reads:
        with graph.inserting_after(read):
            rule = (spec.patch, spec.grid, spec.prefix, spec.align_corners, spec.antialias)
            resized = graph.call_function(resampled_for, (read, placeholder, *rule))
        keep = resized  # the new node reads the parameter itself
        read.replace_all_uses_with(resized, delete_user_cb=lambda user, new=keep: user is not new)
    graph.lint()
    return True
