"""torchvision's detectors on any unifeat backbone, in one call (docs/heads.md).

torchvision's FasterRCNN, MaskRCNN, RetinaNet and FCOS take a ``backbone``
that returns an ``OrderedDict`` of maps of one width and says that width in
an int ``out_channels``. torchvision's own ``BackboneWithFPN`` builds one from
a model whose direct children run in order (it cuts the model with
``IntermediateLayerGetter``), which holds for its ResNets and MobileNets
only. :func:`backbone_with_fpn` builds the same module from any model unifeat
can cut: the levels come from ``feature_info`` (by reduction, so the same call
fits a timm, torchvision, transformers or open_clip model, a module of your
own, or a plain ViT through ``pyramid="simple"``), and torchvision's own
``FeaturePyramidNetwork`` runs on them.

This module imports torchvision; ``import unifeat`` does not import it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

import unifeat
from unifeat._engine.model import FeatureModel
from unifeat._errors import InvalidIndicesError, UnsupportedOptionError
from unifeat._feature_info import FeatureInfo

__all__ = ["DEFAULT_REDUCTIONS", "BackboneWithFPN", "backbone_with_fpn"]

DEFAULT_REDUCTIONS: tuple[int, ...] = (4, 8, 16, 32)
"""The reductions :func:`backbone_with_fpn` takes by default: torchvision's
``returned_layers=[1, 2, 3, 4]`` of a ResNet, which its detectors' default anchors
(five sizes, with the ``"pool"`` level) and ``MultiScaleRoIAlign(["0", "1", "2", "3"])``
are made for."""

# The feature model's output layout that the FPN reads: a list of NCHW maps, which
# BackboneWithFPN keys "0", "1", ... itself. Any other value would change what the
# detector receives, so it is refused rather than overridden.
_LAYOUT_OPTIONS: dict[str, tuple[object, ...]] = {
    "features_only": (True,),
    "output_type": (None, "list"),
    "output_fmt": ("NCHW",),
    "return_nodes": (None,),
    "return_prefix_tokens": (False,),
}


def _shown(values: Sequence[int | float]) -> str:
    return ", ".join(str(v) for v in values)


def _doubling_powers_of_two(values: Sequence[object]) -> bool:
    """Each value an int power of two, each twice the one before (4, 8, 16, 32)."""
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 1]
    if len(ints) != len(values):
        return False
    return all(v & (v - 1) == 0 for v in ints) and all(b == 2 * a for a, b in pairwise(ints))


def _check_out_channels(out_channels: object) -> int:
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
        raise UnsupportedOptionError(
            f"invalid out_channels={out_channels!r} for backbone_with_fpn: expected a positive "
            "int, the width of every map the FPN gives the detector (torchvision's detectors "
            "use 256)"
        )
    return out_channels


def _check_extra_blocks(
    extra_blocks: object, out_channels: int, last_channels: int, context: str
) -> None:
    """Refuse extra blocks torchvision's FPN would reject, or P6/P7 convolutions whose
    width does not fit the maps they will be given (they would fail on the first
    batch, deep inside the detector)."""
    if extra_blocks is None:
        return
    if not isinstance(extra_blocks, ExtraFPNBlock):
        raise UnsupportedOptionError(
            f"invalid extra_blocks={extra_blocks!r} for {context}: expected None (torchvision's "
            "LastLevelMaxPool, the 'pool' level) or a torchvision.ops.feature_pyramid_network."
            "ExtraFPNBlock such as LastLevelP6P7"
        )
    if isinstance(extra_blocks, LastLevelP6P7):
        p6 = extra_blocks.p6
        # torchvision reads P5 (the FPN's last output) where the block was made with
        # in_channels == out_channels, else C5 (the backbone's last map).
        source, width = (
            ("P5, the FPN's last map", out_channels)
            if extra_blocks.use_P5
            else ("C5, the backbone's last level", last_channels)
        )
        if p6.in_channels != width or p6.out_channels != out_channels:
            raise UnsupportedOptionError(
                f"extra_blocks=LastLevelP6P7({p6.in_channels}, {p6.out_channels}) does not fit "
                f"{context} with out_channels={out_channels}: it reads {source} ({width} "
                f"channels) and must give {out_channels}; pass LastLevelP6P7({out_channels}, "
                f"{out_channels}) to read P5 (RetinaNet, FCOS) or LastLevelP6P7("
                f"{last_channels}, {out_channels}) to read C5"
            )


def _check_level_reductions(info: FeatureInfo, context: str) -> None:
    """The selected levels must be at power-of-two reductions, each twice the one
    before. torchvision's ``AnchorGenerator`` takes a level's stride as image size //
    map size (3 for a 3.5 reduction), and ``MultiScaleRoIAlign`` rounds each level's
    scale to a power of two and assigns boxes to consecutive levels: other
    reductions would misplace anchors or pool from the wrong map without an error."""
    reductions = info.reduction()
    if not _doubling_powers_of_two(reductions):
        raise InvalidIndicesError(
            f"out_indices {info.out_indices} of {context} pick levels at reductions "
            f"{_shown(reductions)}: torchvision's detectors need powers of two, each twice the "
            "one before (its anchor generator floors each level's stride to an int, and "
            "MultiScaleRoIAlign assumes consecutive power-of-two levels); the model's levels "
            f"are at {_shown(info.reduction(list(range(len(info)))))}"
        )


class BackboneWithFPN(nn.Module):
    """A unifeat feature model and torchvision's ``FeaturePyramidNetwork`` on its levels:
    the ``backbone`` torchvision's detectors take.

    It is what torchvision's own ``BackboneWithFPN`` is (``body``, ``fpn``, an int
    ``out_channels``, the same ``forward``), with a unifeat feature model as the body,
    so any backend's model fits. ``forward(images)`` returns an ``OrderedDict`` of
    ``out_channels``-wide maps keyed ``"0"``, ``"1"``, ... (one per returned level,
    finest first) followed by the extra blocks' levels (``"pool"`` for the default
    ``LastLevelMaxPool``, ``"p6"`` and ``"p7"`` for ``LastLevelP6P7``).

    :func:`backbone_with_fpn` chooses the levels and builds the body; build this
    class yourself to wrap a feature model you already have. The body's
    returned levels must be NCHW maps at power-of-two reductions, each twice the
    one before (``InvalidIndicesError`` otherwise: see docs/heads.md, "torchvision detection").

    Args:
        body: a :class:`unifeat.FeatureModel` (``features_only=True``), list or dict
            output, NCHW, without prefix tokens.
        out_channels: the width of every map given to the detector.
        extra_blocks: torchvision's ``ExtraFPNBlock`` after the last level;
            ``None`` is torchvision's ``LastLevelMaxPool`` (the ``"pool"`` level).
        norm_layer: the FPN convolutions' normalization (torchvision's ``_v2``
            detectors pass ``nn.BatchNorm2d``); ``None``: none, with biases.

    Attributes:
        body: the feature model; its parameters are named ``body.`` + the source
            model's names (``body.layer1.0.conv1.weight``).
        fpn: torchvision's ``FeaturePyramidNetwork`` (``fpn.inner_blocks.0.0.weight``).
        out_channels: ``out_channels``, as torchvision's detectors read it.
        featmap_names: the keys of the body's levels (``["0", "1", "2", "3"]``),
            what ``MultiScaleRoIAlign`` takes; extra levels not included.
        strides: the reductions of those levels (``[4, 8, 16, 32]``).

    Examples:
        >>> import torch, unifeat
        >>> from unifeat.integrations.torchvision import BackboneWithFPN
        >>> body = unifeat.create_model("tv:resnet18", features_only=True, out_indices=(2, 3, 4))
        >>> backbone = BackboneWithFPN(body, out_channels=64).eval()
        >>> backbone.featmap_names, backbone.strides, backbone.out_channels
        (['0', '1', '2'], [8, 16, 32], 64)
        >>> maps = backbone(torch.randn(1, 3, 64, 64))
        >>> [(name, tuple(m.shape)) for name, m in maps.items()]
        [('0', (1, 64, 8, 8)), ('1', (1, 64, 4, 4)), ('2', (1, 64, 2, 2)), ('pool', (1, 64, 1, 1))]
    """

    body: FeatureModel
    fpn: FeaturePyramidNetwork

    def __init__(
        self,
        body: nn.Module,
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(body, FeatureModel):
            raise UnsupportedOptionError(
                f"invalid body={type(body).__qualname__} for BackboneWithFPN: expected a "
                "unifeat.FeatureModel (unifeat.create_model(..., features_only=True)); "
                "backbone_with_fpn builds one from any model"
            )
        context = f"the feature model of {body._context}"
        if body.output_fmt != "NCHW" or body.return_prefix_tokens:
            raise UnsupportedOptionError(
                f"{context} returns "
                + ("NHWC maps" if body.output_fmt != "NCHW" else "(map, prefix tokens) pairs")
                + ": torchvision's FeaturePyramidNetwork takes NCHW maps; build it with the "
                "defaults output_fmt='NCHW', return_prefix_tokens=False"
            )
        out_channels = _check_out_channels(out_channels)
        info = body.feature_info
        _check_level_reductions(info, context)
        _check_extra_blocks(extra_blocks, out_channels, info.channels()[-1], context)
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=info.channels(),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        reference = next(body.parameters(), None)
        if reference is not None:
            # Where the body was built (device=, dtype= of create_model), not on the CPU.
            self.fpn.to(device=reference.device, dtype=reference.dtype)
        self.out_channels = out_channels
        self.featmap_names = [str(i) for i in range(len(info.out_indices))]
        self.strides = [int(r) for r in info.reduction()]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """The FPN's maps of a batch ``x`` (``[N, C, H, W]``), as torchvision's
        ``BackboneWithFPN`` returns them: ``"0"``, ``"1"``, ... then the extra levels.

        Examples:
            >>> import torch
            >>> from unifeat.integrations.torchvision import backbone_with_fpn
            >>> backbone = backbone_with_fpn("tv:resnet18", out_channels=32).eval()
            >>> list(backbone(torch.randn(1, 3, 64, 64)))
            ['0', '1', '2', '3', 'pool']
        """
        maps = self.body(x)
        levels = list(maps.values()) if isinstance(maps, dict) else list(maps)
        return self.fpn(OrderedDict(zip(self.featmap_names, levels, strict=True)))


def _context(model_or_name: object) -> str:
    if isinstance(model_or_name, str):
        return repr(model_or_name)
    return f"module {type(model_or_name).__qualname__}"


def _check_reductions(reductions: object) -> tuple[int, ...]:
    values = tuple(reductions) if isinstance(reductions, (tuple, list)) else ()
    if not values or not _doubling_powers_of_two(values):
        raise UnsupportedOptionError(
            f"invalid reductions={reductions!r} for backbone_with_fpn: expected a list of "
            "powers of two, each twice the one before, such as (4, 8, 16, 32) (the default: "
            "FasterRCNN, MaskRCNN) or (8, 16, 32) (RetinaNet, FCOS, with LastLevelP6P7)"
        )
    return tuple(int(v) for v in values)


def _refuse_plain(info: FeatureInfo, reductions: Sequence[int], context: str) -> None:
    """A plain model (a ViT) has one map size: a detector's FPN needs several."""
    found = {level.reduction for level in info.levels}
    if len(found) == 1 and len(info) > 1:
        (only,) = found
        raise UnsupportedOptionError(
            f"{context} is a plain model: all its {len(info)} levels are at reduction {only}, "
            f"while a detector's FPN takes levels at reductions {_shown(reductions)}: pass "
            "pyramid='simple' (ViTDet's simple feature pyramid, docs/levels.md) to build them "
            "from its last block"
        )


def _choose_levels(info: FeatureInfo, reductions: Sequence[int], context: str) -> tuple[int, ...]:
    """The deepest level at each reduction (a stage's last output, as torchvision's
    ``returned_layers`` picks ``layer1``..``layer4``; open_clip's ModifiedResNet has its
    stem and ``layer1`` both at 4)."""
    _refuse_plain(info, reductions, context)
    every = [level.reduction for level in info.levels]
    deepest = {reduction: index for index, reduction in enumerate(every)}
    missing = [r for r in reductions if r not in deepest]
    if missing:
        raise UnsupportedOptionError(
            f"{context} has levels at reductions {_shown(every)}, not at {_shown(missing)}: "
            f"backbone_with_fpn takes the levels at {_shown(reductions)}; pass reductions= "
            "(powers of two, each twice the one before) or out_indices= to choose others "
            "the model has"
        )
    chosen = tuple(deepest[r] for r in reductions)
    if list(chosen) != sorted(set(chosen)):
        raise UnsupportedOptionError(
            f"{context} has levels at reductions {_shown(every)}, which do not grow with "
            f"depth: the FPN needs its levels at {_shown(reductions)} in depth order; pass "
            "out_indices= to choose them"
        )
    return chosen


def backbone_with_fpn(
    model_or_name: str | nn.Module,
    out_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    *,
    reductions: Sequence[int] | None = None,
    norm_layer: Callable[..., nn.Module] | None = None,
    **create_model_options: Any,
) -> BackboneWithFPN:
    """The backbone for torchvision's FasterRCNN, MaskRCNN, RetinaNet and FCOS, from any
    model unifeat can build: a feature model and torchvision's ``FeaturePyramidNetwork``.

    The levels are chosen by their reductions in ``feature_info``, not by module
    names, so the same call fits every backend: by default the deepest level at
    each of the reductions 4, 8, 16 and 32, which is what torchvision's
    ``resnet_fpn_backbone`` returns (``returned_layers=[1, 2, 3, 4]``: ``layer1`` to
    ``layer4`` of a ResNet), so torchvision's default anchors (five sizes, one per
    level with ``"pool"``) and ``MultiScaleRoIAlign(["0", "1", "2", "3"])`` fit as
    they are. RetinaNet and FCOS use the levels at 8, 16 and 32 and P6/P7 (see
    docs/heads.md, "torchvision detection" for what to pass to each detector).

    Names: the feature model is ``body`` and the FPN ``fpn``, as in torchvision's
    ``BackboneWithFPN`` (``body.layer1.0.conv1.weight``,
    ``fpn.inner_blocks.0.0.weight``); the body keeps the source model's names, so
    for a torchvision ResNet the keys are those of torchvision's own
    ``resnet_fpn_backbone`` and its checkpoints load.

    Normalization is the model's own, as ``create_model`` builds it: nothing is
    replaced by ``FrozenBatchNorm2d`` and nothing is frozen unless asked. To
    fine-tune pretrained weights as torchvision's detectors do (``FrozenBatchNorm2d``,
    ``trainable_backbone_layers=3``), pass ``pretrained=True, norm_eval=True,
    frozen_levels=`` the index of the reduction-4 level (1 for a ResNet): the
    running statistics stay fixed and the stem and first stage stop training
    (the BatchNorm affine parameters of later stages still train, as in
    mmdetection; docs/heads.md, "torchvision detection", "Frozen BatchNorm").

    Args:
        model_or_name: a model name (``"timm:resnet50"``, ``"tv:resnet50"``,
            ``"hf:microsoft/resnet-50"``, ``"oc:RN50"``) or an ``nn.Module``, as
            :func:`unifeat.create_model` takes it.
        out_channels: the width of every map given to the detector.
        extra_blocks: torchvision's ``ExtraFPNBlock`` after the last level: ``None``
            for ``LastLevelMaxPool`` (the ``"pool"`` level FasterRCNN and MaskRCNN
            expect), ``LastLevelP6P7(out_channels, out_channels)`` for RetinaNet
            and FCOS.
        reductions: the reductions of the levels to take, powers of two each
            twice the one before; default ``(4, 8, 16, 32)``. ``(8, 16, 32)`` is
            torchvision's ``returned_layers=[2, 3, 4]`` (RetinaNet, FCOS).
        norm_layer: the FPN convolutions' normalization (``nn.BatchNorm2d`` in
            torchvision's ``_v2`` detectors); ``None``: none.
        **create_model_options: :func:`unifeat.create_model`'s options
            (``pretrained``, ``pyramid="simple"`` for a plain ViT, ``frozen_levels``,
            ``norm_eval``, ``output_stride``, ``checkpoint_path``, ``device``,
            ``dtype``, the model's constructor kwargs, ...). ``out_indices=`` chooses
            the levels instead of ``reductions``. The output layout is this
            function's (a list of NCHW maps): ``output_type``, ``output_fmt``,
            ``return_nodes``, ``return_prefix_tokens`` and ``features_only=False``
            are refused.

    Returns:
        A :class:`BackboneWithFPN`: ``forward(images)`` gives an ``OrderedDict`` of
        ``out_channels``-wide maps, ``"0"`` to ``"3"`` then ``"pool"`` by default.

    Raises:
        UnsupportedOptionError: a plain model (a ViT) without ``pyramid="simple"``;
            a model without levels at ``reductions`` (the message names its
            reductions); a bad ``out_channels``, ``reductions`` or
            ``extra_blocks`` (P6/P7 convolutions of the wrong width); a layout
            option; anything :func:`unifeat.create_model` refuses.
        InvalidIndicesError: ``out_indices`` out of range, or picking levels at
            reductions torchvision's detectors cannot use (not powers of two each
            twice the one before).

    Examples:
        >>> import torch
        >>> from torchvision.models.detection import FasterRCNN
        >>> from unifeat.integrations.torchvision import backbone_with_fpn
        >>> backbone = backbone_with_fpn("tv:resnet18", out_channels=64)
        >>> backbone.body.feature_info.module_name(), backbone.strides
        (['layer1', 'layer2', 'layer3', 'layer4'], [4, 8, 16, 32])
        >>> detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).eval()
        >>> with torch.no_grad():
        ...     (found,) = detector([torch.rand(3, 64, 64)])
        >>> sorted(found)
        ['boxes', 'labels', 'scores']
        >>> vit = backbone_with_fpn("timm:vit_tiny_patch16_224", out_channels=64,
        ...                         pyramid="simple", img_size=64, depth=4)
        >>> vit.body.feature_info.reduction()
        [4, 8, 16, 32]
    """
    out_channels = _check_out_channels(out_channels)
    context = _context(model_or_name)
    for option, accepted in _LAYOUT_OPTIONS.items():
        if option in create_model_options and create_model_options[option] not in accepted:
            raise UnsupportedOptionError(
                f"{option}={create_model_options[option]!r} does not apply to backbone_with_fpn "
                f"of {context}: it gives torchvision's FeaturePyramidNetwork a list of NCHW maps "
                "and keys them '0', '1', ... itself; leave it out"
            )
    options = {k: v for k, v in create_model_options.items() if k not in _LAYOUT_OPTIONS}
    if extra_blocks is not None and not isinstance(extra_blocks, ExtraFPNBlock):
        _check_extra_blocks(extra_blocks, out_channels, 0, context)
    out_indices = options.pop("out_indices", None)
    if reductions is not None and out_indices is not None:
        raise UnsupportedOptionError(
            f"backbone_with_fpn of {context} was given both reductions={reductions!r} and "
            f"out_indices={out_indices!r}: each chooses the levels; give one of them"
        )
    wanted = DEFAULT_REDUCTIONS if reductions is None else _check_reductions(reductions)
    # On the meta device, before any weights are made or loaded: every refusal below
    # comes before the real build, which happens once.
    info = unifeat.feature_info(model_or_name, out_indices=out_indices, **options)
    if out_indices is None:
        out_indices = _choose_levels(info, wanted, context)
        info = FeatureInfo(levels=info.levels, out_indices=out_indices)
    else:
        _refuse_plain(info, wanted, context)
    _check_level_reductions(info, context)
    _check_extra_blocks(extra_blocks, out_channels, info.channels()[-1], context)
    body = unifeat.create_model(
        model_or_name, features_only=True, out_indices=out_indices, output_type="list", **options
    )
    return BackboneWithFPN(body, out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
