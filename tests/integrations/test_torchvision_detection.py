"""torchvision's detectors on ``backbone_with_fpn`` (docs/heads.md, "torchvision detection").

Each detector takes a training step (targets, losses, backward, an optimizer
step) and then detects, on a tiny backbone of every backend and on a ViT
through the simple pyramid; torchvision's own ResNet backbone and detector
give the same numbers with the same weights; bad values are unifeat errors.
The whole grid runs in the default suite (each case takes seconds).
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import unifeat
from tests.configs import HF_DINOV2_64, HF_RESNET_TINY, OC_RN50_TINY, FiveStageNet
from unifeat.integrations.torchvision import BackboneWithFPN, backbone_with_fpn

_VIT_PYRAMID = dict(img_size=64, depth=4, pyramid="simple")
BACKBONES: dict[str, tuple[Any, dict[str, Any]]] = {
    "timm": ("timm:test_resnet", {}),
    "torchvision": ("tv:resnet18", {}),
    "transformers": (
        "hf:resnet",
        HF_RESNET_TINY,
    ),
    "open_clip": ("oc:RN50", OC_RN50_TINY),
    "module": (FiveStageNet, {}),
    "vit-pyramid": ("timm:vit_tiny_patch16_224", _VIT_PYRAMID),
    "hf-vit-pyramid": ("hf:dinov2", {**HF_DINOV2_64, "pyramid": "simple"}),
    "oc-vit-pyramid": (
        "oc:ViT-B-32",
        dict(layers=4, width=64, head_width=32, image_size=64, patch_size=16, pyramid="simple"),
    ),
}
DETECTORS = ("FasterRCNN", "MaskRCNN", "RetinaNet", "FCOS")
LOSSES = {
    "FasterRCNN": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "MaskRCNN": {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    },
    "RetinaNet": {"classification", "bbox_regression"},
    "FCOS": {"classification", "bbox_regression", "bbox_ctrness"},
}
WIDTH = 32  # FPN width: FCOS's GroupNorm(32) heads need a multiple of 32
SIZE = 128


def _model(backbone: str) -> tuple[Any, dict[str, Any]]:
    name, kwargs = BACKBONES[backbone]
    return (name() if isinstance(name, type) else name), dict(kwargs)


def detector(kind: str, backbone: str) -> nn.Module:
    """What docs/heads.md, "torchvision detection" says to pass to each detector, with small
    proposal counts and heads to keep the test fast."""
    name, kwargs = _model(backbone)
    size = dict(min_size=SIZE, max_size=SIZE)
    if kind in ("RetinaNet", "FCOS"):
        # torchvision's retinanet_resnet50_fpn / fcos_resnet50_fpn: returned_layers=[2, 3, 4]
        # and P6/P7 from P5; the default anchor generators have five sizes, for 8..128.
        body = backbone_with_fpn(
            name, WIDTH, LastLevelP6P7(WIDTH, WIDTH), reductions=(8, 16, 32), **kwargs
        )
        cls = RetinaNet if kind == "RetinaNet" else FCOS
        return cls(
            body, num_classes=3, score_thresh=0.0, topk_candidates=50, detections_per_img=10, **size
        )
    body = backbone_with_fpn(name, WIDTH, **kwargs)
    proposals = dict(
        rpn_pre_nms_top_n_train=50,
        rpn_post_nms_top_n_train=20,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=16,
        box_score_thresh=0.0,
        box_detections_per_img=10,
    )
    if kind == "FasterRCNN":
        return FasterRCNN(body, num_classes=3, **size, **proposals)
    # A custom mask head takes the classes from its predictors (num_classes=None).
    return MaskRCNN(
        body,
        box_predictor=FastRCNNPredictor(1024, 3),
        mask_head=MaskRCNNHeads(WIDTH, [WIDTH, WIDTH], dilation=1),
        mask_predictor=MaskRCNNPredictor(WIDTH, WIDTH, 3),
        **size,
        **proposals,
    )


def _batch(masks: bool) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A square and a landscape image (the batch is padded), two boxes each."""
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 96, SIZE)]
    boxes = [
        torch.tensor([[10.0, 20.0, 70.0, 90.0], [50.0, 40.0, 120.0, 110.0]]),
        torch.tensor([[5.0, 5.0, 60.0, 50.0], [64.0, 30.0, 125.0, 90.0]]),
    ]
    targets = []
    for image, box in zip(images, boxes, strict=True):
        target = {"boxes": box, "labels": torch.tensor([1, 2])}
        if masks:
            mask = torch.zeros(2, *image.shape[1:], dtype=torch.uint8)
            for plane, (x0, y0, x1, y1) in zip(mask, box.int().tolist(), strict=True):
                plane[y0:y1, x0:x1] = 1
            target["masks"] = mask
        targets.append(target)
    return images, targets


def _grid() -> list[Any]:
    return [
        pytest.param(
            kind,
            backbone,
            id=f"{kind}-{backbone}",
        )
        for kind in DETECTORS
        for backbone in BACKBONES
    ]


@pytest.mark.parametrize(("kind", "backbone"), _grid())
def test_detector_trains_then_detects(kind: str, backbone: str) -> None:
    net = detector(kind, backbone)
    before = {name: p.detach().clone() for name, p in net.backbone.named_parameters()}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    images, targets = _batch(masks=kind == "MaskRCNN")

    losses = net.train()(images, targets)
    assert set(losses) == LOSSES[kind]
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    optimizer.zero_grad()
    sum(losses.values()).backward()
    # A feature model holds only what its levels compute, so every backbone
    # parameter, the body's and the FPN's, gets a gradient.
    missing = [
        name
        for name, p in net.backbone.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, missing
    optimizer.step()
    moved = {
        name.split(".")[0]
        for name, p in net.backbone.named_parameters()
        if not torch.equal(p, before[name])
    }
    assert moved == {"body", "fpn"}

    with torch.no_grad():
        found = net.eval()(images)
    for image, detections in zip(images, found, strict=True):
        height, width = image.shape[1:]
        boxes = detections["boxes"]
        assert 0 < len(boxes) <= 10
        assert detections["scores"].shape == detections["labels"].shape == (len(boxes),)
        assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        if kind == "MaskRCNN":
            assert detections["masks"].shape == (len(boxes), 1, height, width)


@pytest.mark.parametrize("backbone", ["vit-pyramid", "module"])
@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 160)])
def test_maps_have_the_sizes_feature_info_says(backbone: str, height: int, width: int) -> None:
    """Every map of the FPN is at its level's reduction (as feature_info reports it),
    at the built size and at another; the extra "pool" level halves the last."""
    name, kwargs = _model(backbone)
    net = backbone_with_fpn(name, WIDTH, **kwargs).eval()
    info = net.body.feature_info
    assert info.reduction() == net.strides == [4, 8, 16, 32]
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        levels = net.body(x)
        maps = net(x)
    assert [m.shape[1] for m in levels] == info.channels()
    expected = [(2, WIDTH, height // r, width // r) for r in info.reduction()]
    last = expected[-1]
    expected.append((2, WIDTH, math.ceil(last[2] / 2), math.ceil(last[3] / 2)))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape) for m in maps.values()] == expected


def _resnet18_pair(**unifeat_options: Any) -> tuple[nn.Module, nn.Module]:
    """torchvision's own ResNet-18 FPN backbone, frozen as its detectors freeze a
    pretrained one (FrozenBatchNorm2d, trainable_backbone_layers=3), and unifeat's."""
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    ours = backbone_with_fpn("tv:resnet18", **unifeat_options)
    return theirs, ours


def test_torchvision_checkpoints_load_and_give_the_same_detections() -> None:
    """The names are torchvision's (``backbone.body.layer1...``, ``backbone.fpn...``):
    a whole torchvision FasterRCNN's state dict loads, and detects the same."""
    theirs, ours = _resnet18_pair()
    options = dict(
        num_classes=3,
        min_size=SIZE,
        max_size=SIZE,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_score_thresh=0.0,
    )
    reference = FasterRCNN(theirs, **options).eval()
    net = FasterRCNN(ours, **options).eval()
    # FrozenBatchNorm2d has no num_batches_tracked, which BatchNorm2d fills in on load.
    assert net.load_state_dict(reference.state_dict()) is not None
    extra = set(net.state_dict()) - set(reference.state_dict())
    assert extra and all(key.endswith(".num_batches_tracked") for key in extra)
    images, _ = _batch(masks=False)
    with torch.no_grad():
        got, expected = net(images), reference(images)
    for mine, theirs_found in zip(got, expected, strict=True):
        assert len(theirs_found["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(mine[key], theirs_found[key])


def test_frozen_levels_and_norm_eval_train_as_torchvision_frozen_backbones() -> None:
    """``frozen_levels=1, norm_eval=True`` is torchvision's FrozenBatchNorm2d with
    ``trainable_layers=3``: the same maps in training mode, the stem and layer1
    frozen, no statistic updated; only the BatchNorm affine parameters of
    layer2..4 still train (docs/heads.md, "torchvision detection", "Frozen BatchNorm")."""
    theirs, ours = _resnet18_pair(frozen_levels=1, norm_eval=True)
    ours.load_state_dict(theirs.state_dict())
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    norms = {
        f"{name}.{kind}"
        for name, module in ours.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for kind in ("weight", "bias")
    }
    assert trainable - norms == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert not any(name.startswith(("body.conv1", "body.layer1")) for name in trainable)

    statistics = {k: v.clone() for k, v in ours.state_dict().items() if "running" in k}
    x = torch.randn(2, 3, 64, 96)
    got, expected = ours.train()(x), theirs.train()(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    sum(m.mean() for m in got.values()).backward()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in statistics.items())
    assert ours.body.conv1.weight.grad is None
    assert ours.body.get_submodule("layer2.0.conv1").weight.grad is not None


def test_state_dict_round_trips() -> None:
    """Keys are ``body.`` + the source's names and ``fpn.``; loaded into a second
    backbone (and through a file), the maps are the same."""
    name, kwargs = _model("vit-pyramid")
    first = backbone_with_fpn(name, WIDTH, **kwargs).eval()
    torch.manual_seed(1)
    second = backbone_with_fpn(name, WIDTH, **kwargs).eval()
    keys = list(first.state_dict())
    assert {key.split(".")[0] for key in keys} == {"body", "fpn"}
    assert "body.pyramid.up4.0.weight" in keys and "body.blocks.3.mlp.fc2.weight" in keys
    assert "body.head.weight" not in keys and "fpn.inner_blocks.0.0.weight" in keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(first(x)["0"], second(x)["0"])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        mine, theirs = first(x), second(x)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_explicit_out_indices_choose_the_levels() -> None:
    net = backbone_with_fpn("tv:resnet18", WIDTH, out_indices=(2, 3, 4))
    assert net.featmap_names == ["0", "1", "2"] and net.strides == [8, 16, 32]
    reduced = backbone_with_fpn("oc:RN50", WIDTH, reductions=(4, 8), **_model("open_clip")[1])
    # open_clip's ModifiedResNet has its stem and layer1 at 4: the deeper one is taken.
    assert reduced.body.feature_info.module_name() == ["layer1", "layer2"]


def test_a_feature_model_in_hand_is_wrapped() -> None:
    body = unifeat.create_model("timm:test_resnet", features_only=True, out_indices=(1, 2, 3, 4))
    net = BackboneWithFPN(body, WIDTH).eval()
    assert net.body is body and net.out_channels == WIDTH
    with torch.no_grad():
        assert list(net(torch.randn(1, 3, 64, 64))) == ["0", "1", "2", "3", "pool"]


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options", "error", "match"),
    [
        (
            "timm:vit_tiny_patch16_224",
            dict(img_size=64, depth=4),
            unifeat.UnsupportedOptionError,
            r"plain model: all its 4 levels are at reduction 16.*pass pyramid='simple'",
        ),
        (
            "timm:vit_tiny_patch16_224",
            dict(img_size=64, depth=4, out_indices=(-1,)),
            unifeat.UnsupportedOptionError,
            r"pass pyramid='simple'",
        ),
        (
            "timm:test_resnet",
            dict(output_stride=16),
            unifeat.UnsupportedOptionError,
            r"reductions 2, 4, 8, 16, 16, not at 32",
        ),
        (
            # A patch-14 model's pyramid is at 3.5, 7, 14 and 28.
            "hf:dinov2",
            dict(
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                image_size=56,
                patch_size=14,
                pyramid="simple",
            ),
            unifeat.UnsupportedOptionError,
            r"reductions 3.5, 7, 14, 28, not at 4, 8, 16, 32",
        ),
        (
            "timm:test_resnet",
            dict(out_indices=(1, 3, 4)),
            unifeat.InvalidIndicesError,
            r"out_indices \(1, 3, 4\).*reductions 4, 16, 32: .*each twice the one before",
        ),
        ("timm:test_resnet", dict(out_indices=(7,)), unifeat.InvalidIndicesError, r"0\.\.4"),
        (
            "timm:test_resnet",
            dict(out_channels=0),
            unifeat.UnsupportedOptionError,
            r"invalid out_channels=0",
        ),
        (
            "timm:test_resnet",
            dict(out_channels=256.0),
            unifeat.UnsupportedOptionError,
            r"invalid out_channels=256\.0",
        ),
        (
            "timm:test_resnet",
            dict(out_channels=True),
            unifeat.UnsupportedOptionError,
            r"invalid out_channels=True",
        ),
        (
            "timm:test_resnet",
            dict(reductions=(4, 16)),
            unifeat.UnsupportedOptionError,
            r"invalid reductions=\(4, 16\)",
        ),
        (
            "timm:test_resnet",
            dict(reductions=(6, 12)),
            unifeat.UnsupportedOptionError,
            r"invalid reductions=\(6, 12\)",
        ),
        (
            "timm:test_resnet",
            dict(reductions=(8, 16), out_indices=(2, 3)),
            unifeat.UnsupportedOptionError,
            r"both reductions=\(8, 16\) and out_indices=\(2, 3\)",
        ),
        (
            "timm:test_resnet",
            dict(extra_blocks=nn.Identity()),
            unifeat.UnsupportedOptionError,
            r"invalid extra_blocks=Identity\(\).*ExtraFPNBlock",
        ),
        (
            "timm:test_resnet",
            dict(out_channels=64, extra_blocks=LastLevelP6P7(256, 256)),
            unifeat.UnsupportedOptionError,
            r"LastLevelP6P7\(256, 256\) does not fit.*P5.*LastLevelP6P7\(64, 64\)",
        ),
        (
            "timm:test_resnet",
            dict(output_type="dict"),
            unifeat.UnsupportedOptionError,
            r"output_type='dict' does not apply to backbone_with_fpn",
        ),
        (
            "timm:test_resnet",
            dict(features_only=False),
            unifeat.UnsupportedOptionError,
            r"features_only=False",
        ),
    ],
    ids=[
        "vit-without-pyramid",
        "vit-without-pyramid-out_indices",
        "no-level-at-32",
        "patch-14-pyramid",
        "out_indices-skip-a-level",
        "out_indices-out-of-range",
        "out_channels-0",
        "out_channels-float",
        "out_channels-bool",
        "reductions-skip",
        "reductions-not-powers-of-two",
        "reductions-and-out_indices",
        "extra_blocks-not-a-block",
        "extra_blocks-wrong-width",
        "output_type",
        "features_only-false",
    ],
)
def test_bad_values_are_unifeat_errors(
    model: str, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        backbone_with_fpn(model, **options)


def test_bodies_that_do_not_fit_are_refused() -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"expected a unifeat.FeatureModel"):
        BackboneWithFPN(nn.Conv2d(3, 8, 1))
    nhwc = unifeat.create_model("timm:test_resnet", features_only=True, output_fmt="NHWC")
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"NHWC maps"):
        BackboneWithFPN(nhwc)
    skipping = unifeat.create_model("timm:test_resnet", features_only=True, out_indices=(2, 4))
    with pytest.raises(unifeat.InvalidIndicesError, match=r"reductions 8, 32"):
        BackboneWithFPN(skipping)
