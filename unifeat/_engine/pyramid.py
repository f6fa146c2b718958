"""ViTDet's simple feature pyramid: four levels from a plain backbone's last map.

A plain ViT (DINOv2, CLIP, EVA, MAE, an open_clip tower) keeps one map size
throughout, while detection and segmentation heads want a pyramid at strides
4 to 32. ViTDet (Li et al., 2022) showed that the last block's map, rescaled,
is enough: its scale stage (``SimpleFeaturePyramid`` in detectron2, mmdet's
``SimpleFPN``) gives, from a map of width ``C`` at the patch size ``p``:

* ``up4``: two stride-2 transposed convolutions, a channels-first LayerNorm and
  a GELU between them: ``C / 4`` channels at ``p / 4``;
* ``up2``: one stride-2 transposed convolution: ``C / 2`` at ``p / 2``;
* ``same``: the map itself: ``C`` at ``p``;
* ``down2``: a 2x2 max-pool: ``C`` at ``2 p``.

unifeat builds only the scale stage (the per-level output convolutions of
detectron2 belong to the head: an FPN, a decoder), with detectron2's
initialization (PyTorch's defaults, LayerNorm at one and zero, eps 1e-6), under
one prefix, ``pyramid.``. :class:`PyramidRunner` puts it behind any runner, so
every backend's plain models get it the same way (docs/levels.md, "A simple
pyramid for plain models").
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from unifeat._engine.levels import FeatureMap, Level
from unifeat._engine.model import Runner
from unifeat._errors import InvalidIndicesError, UnsupportedOptionError, format_choices

PYRAMIDS = ("simple",)
"""The values ``pyramid=`` takes."""
PREFIX = "pyramid"
"""Where the pyramid's layers sit in the feature model (``pyramid.up4.0.weight``)."""
SCALES: dict[str, float] = {"up4": 4.0, "up2": 2.0, "same": 1.0, "down2": 0.5}
"""The four levels, shallowest first, and how much each enlarges the map."""


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (detectron2's ``"LN"``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _scale(name: str, dim: int) -> nn.Module:
    if name == "up4":
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
        )
    if name == "up2":
        return nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)
    if name == "same":
        return nn.Identity()
    return nn.MaxPool2d(kernel_size=2, stride=2)


class SimplePyramid(nn.Module):
    """The scale stage, holding the layers of the levels it is asked for only."""

    def __init__(self, dim: int, names: Sequence[str]) -> None:
        super().__init__()
        for name in SCALES:
            if name in names:
                self.add_module(name, _scale(name, dim))


def check_pyramid(pyramid: object, levels: Sequence[Level], *, context: str) -> None:
    """Refuse a ``pyramid=`` value unifeat does not have, or a backbone it does not fit."""
    if pyramid not in PYRAMIDS:
        raise UnsupportedOptionError(
            f"invalid pyramid={pyramid!r} for {context}: expected {format_choices(PYRAMIDS)} "
            "(ViTDet's simple feature pyramid) or None"
        )
    if len({level.reduction for level in levels}) != 1:
        shown = ", ".join(str(r) for r in dict.fromkeys(level.reduction for level in levels))
        raise UnsupportedOptionError(
            f"pyramid='simple' builds a pyramid from the one map size of a plain model (a ViT), "
            f"but {context} is hierarchical (reductions {shown}): its levels are a pyramid "
            "already; leave pyramid out"
        )
    dim = levels[-1].num_chs
    if dim % 4:
        raise UnsupportedOptionError(
            f"pyramid='simple' gives {context}'s {dim}-channel map levels of {dim}/4 and {dim}/2 "
            "channels, so its width must be a multiple of 4"
        )


def _exact(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def pyramid_levels(block: Level) -> list[Level]:
    """The four levels of a pyramid on ``block`` (the backbone's last map).

    A patch-16 model's levels are at reductions 4, 8, 16 and 32; a patch-14
    model's at 3.5, 7, 14 and 28, reported as they are."""
    dim, patch = block.num_chs, block.reduction
    channels = {"up4": dim // 4, "up2": dim // 2, "same": dim, "down2": dim}
    return [
        Level(
            f"{PREFIX}.{name}",
            channels[name],
            _exact(patch / factor),  # type: ignore[arg-type]
            "NCHW",
            where=f"{PREFIX}.{name}",
            extra={"source": block.module},
        )
        for name, factor in SCALES.items()
    ]


def attach_pyramid(root: nn.Module, block: Level, levels: Sequence[Level]) -> None:
    """Add the scale stage of ``levels`` to ``root`` under :data:`PREFIX`, on the device
    and in the dtype of ``root``'s parameters."""
    if PREFIX in dict(root.named_children()):
        raise UnsupportedOptionError(
            f"the model already has a submodule named {PREFIX!r}, where pyramid='simple' puts "
            "its layers"
        )
    names = [lv.where.split(".", 1)[1] for lv in levels]
    reference = next(root.parameters(), None)
    if reference is None:
        pyramid = SimplePyramid(block.num_chs, names)
    else:
        # Made where the backbone lives (no CPU copy first), in its dtype.
        with reference.device:
            pyramid = SimplePyramid(block.num_chs, names).to(dtype=reference.dtype)
    root.add_module(PREFIX, pyramid)


class PyramidRunner(Runner):
    """A runner's last block, then the pyramid (its levels are the pyramid's)."""

    prunes_apart = True

    def __init__(self, inner: Runner, levels: Sequence[Level], kept: Sequence[int]) -> None:
        self.inner = inner
        self.levels = tuple(levels)
        self.kept = tuple(sorted(kept))
        self.last_level = max(self.kept)
        self.final_norm = inner.final_norm
        self.trims = inner.trims

    @property
    def input_levels(self) -> tuple[Level, ...]:
        return self.inner.input_levels

    def grid_levels(self, indices: Sequence[int]) -> list[Level]:
        return self.inner.grid_levels([self.inner.last_level])

    def depth_runner(self) -> Runner:
        return self.inner

    def computable(self) -> list[int]:
        return list(self.kept)

    def level_module(self, index: int) -> str:
        return self.levels[index].where

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
        missing = [i for i in indices if i not in self.kept]
        if missing:
            raise InvalidIndicesError(
                f"pyramid level {missing[0]} of {context} was pruned: it keeps levels {self.kept}"
            )
        (block,), output = self.inner.run(
            root,
            x,
            [self.inner.last_level],
            final=final,
            norm=norm,
            prefix_tokens=False,
            context=context,
        )
        assert isinstance(block, Tensor)
        maps: list[FeatureMap] = [root.get_submodule(self.levels[i].where)(block) for i in indices]
        return maps, output

    def prune(
        self,
        root: nn.Module,
        last_level: int,
        *,
        drop_final: bool,
        indices: Sequence[int] = (),
    ) -> nn.Module:
        """Drop the scales of the levels not in ``indices``; the backbone stays whole
        (every level reads its last map)."""
        kept = tuple(sorted(indices)) if indices else self.kept
        pyramid = root.get_submodule(PREFIX)
        for i, level in enumerate(self.levels):
            name = level.where.split(".", 1)[1]
            if i not in kept and hasattr(pyramid, name):
                delattr(pyramid, name)
        self.kept = kept
        self.last_level = max(kept)
        if drop_final:
            root = self.inner.prune(root, self.inner.last_level, drop_final=True)
            self.final_norm = self.inner.final_norm
        return root

    def set_mode(self, root: nn.Module, training: bool) -> None:
        self.inner.set_mode(root, training)

    def set_grad_checkpointing(self, root: nn.Module, enable: bool) -> int:
        from unifeat._engine.training import checkpoint_modules

        inner = self.inner.set_grad_checkpointing(root, enable)
        paths = [self.levels[i].where for i in self.kept]
        return inner + checkpoint_modules(root, paths, enable)
