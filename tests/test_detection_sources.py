"""Detection and segmentation models as sources: their backbone's levels, checked
against the classification backbone they share and, with the same weights, against
the models' own backbone outputs (docs/heads.md, "Detection and segmentation models
as sources"; docs/backends/torchvision.md and docs/backends/hf.md).

No test downloads: torchvision's pretrained path reads a weights file the test puts
in the hub cache (``$TORCH_HOME``), transformers models come from configs or from a
directory the test saves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FrozenBatchNorm2d

import unifeat
from unifeat import CheckpointError, InvalidNodeError, UnknownModelError, UnsupportedOptionError

X64 = (2, 3, 64, 64)
DETECTION = [
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
]
SEGMENTATION = [
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "fcn_resnet101",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
]
# The FPN's outputs of torchvision's R-CNNs as nodes of the feature model's graph,
# keyed as the model's own backbone(x) keys them.
RCNN_FPN_NODES = {
    "backbone.fpn.layer_blocks.0": "0",
    "backbone.fpn.layer_blocks.1": "1",
    "backbone.fpn.layer_blocks.2": "2",
    "backbone.fpn.layer_blocks.3": "3",
    "backbone.fpn.extra_blocks.max_pool2d": "pool",
}


def _levels(info: unifeat.FeatureInfo) -> list[tuple[int, float]]:
    return [(level["num_chs"], level["reduction"]) for level in info]


def _randomize_frozen_norms(model: nn.Module) -> None:
    """FrozenBatchNorm2d starts as the identity; statistics of its own make a
    comparison mean something (and eps 0.0 matter)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)


@pytest.fixture(scope="module")
def fasterrcnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A Faster R-CNN as its COCO_V1 weights load into it (torchvision's public pieces:
    a FrozenBatchNorm2d ResNet-50 FPN, eps 0.0 as ``overwrite_eps`` sets it), random
    weights, and its full state dict written to a file."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    )
    model = FasterRCNN(backbone, num_classes=91)
    overwrite_eps(model, 0.0)
    _randomize_frozen_norms(model)
    path = tmp_path_factory.mktemp("fasterrcnn") / "fasterrcnn.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


# -- torchvision: names ------------------------------------------------------------------


def test_every_detection_and_segmentation_model_is_listed() -> None:
    names = unifeat.list_models(backend="tv")
    assert sorted(DETECTION + SEGMENTATION) == sorted(
        name for name in names if name in {*DETECTION, *SEGMENTATION}
    )
    assert len(names) == len(torchvision.models.list_models(module=torchvision.models)) + 18
    assert "torchvision:maskrcnn_resnet50_fpn_v2" in unifeat.list_models("maskrcnn*")
    with pytest.raises(UnknownModelError, match="torchvision:fasterrcnn_resnet50_fpn"):
        unifeat.feature_info("tv:fasterrcnn_resnet50_fpnn")


# -- torchvision: levels -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "classification", "options"),
    [
        ("fasterrcnn_resnet50_fpn", "resnet50", {}),
        ("maskrcnn_resnet50_fpn_v2", "resnet50", {}),
        ("retinanet_resnet50_fpn", "resnet50", {}),
        ("fasterrcnn_mobilenet_v3_large_fpn", "mobilenet_v3_large", {}),
        ("deeplabv3_resnet50", "resnet50", {"output_stride": 8}),
        ("fcn_resnet101", "resnet101", {"output_stride": 8}),
        ("lraspp_mobilenet_v3_large", "mobilenet_v3_large", {"output_stride": 16}),
    ],
)
def test_levels_are_the_classification_backbones(
    name: str, classification: str, options: dict[str, Any]
) -> None:
    """A detection model's body is its classification backbone (the FPN is neck); a
    segmentation model's is the classification backbone torchvision dilates: DeepLabV3
    and FCN ResNets to stride 8, LR-ASPP's MobileNetV3 to 16."""
    info = unifeat.feature_info(f"tv:{name}")
    expected = unifeat.feature_info(f"tv:{classification}", **options)
    assert _levels(info) == _levels(expected)
    assert info.out_indices == expected.out_indices
    body = "backbone.body." if "fpn" in name else "backbone."
    assert all(module.startswith(body) for module in info.module_name())
    if "resnet" in name:  # the same modules under the model's backbone
        assert info.module_name() == [body + module for module in expected.module_name()]


def test_ssd_levels_are_the_trunk_before_its_extra_layers() -> None:
    """SSD300's trunk is VGG-16's up to conv5, with fc6 and fc7 as convolutions in
    place of the last pool (its first extra block); SSDlite splits MobileNetV3's C4
    block after its expansion, with the reduced tail its weights have."""
    ssd = _levels(unifeat.feature_info("tv:ssd300_vgg16"))
    vgg = _levels(unifeat.feature_info("tv:vgg16"))
    assert ssd[:4] == vgg[:4] and ssd[4] == (1024, 16)
    lite = unifeat.feature_info("tv:ssdlite320_mobilenet_v3_large")
    with torch.device("meta"):
        tail = torchvision.models.mobilenet_v3_large(reduced_tail=True)
    reduced = _levels(unifeat.feature_info(tail))
    assert _levels(lite)[:3] == reduced[:3]
    assert _levels(lite)[3] == (6 * reduced[3][0], 16)  # C4's expansion, what SSDlite reads
    assert _levels(lite)[4] == reduced[4] == (480, 32)


def test_output_stride_dilates_a_detection_body_and_is_refused_for_segmentation() -> None:
    info = unifeat.feature_info("tv:fasterrcnn_resnet50_fpn", output_stride=16)
    assert info.reduction() == [2, 4, 8, 16, 16]
    with pytest.raises(UnsupportedOptionError, match="dilated to the stride its weights"):
        unifeat.feature_info("tv:deeplabv3_resnet50", output_stride=16)
    assert unifeat.feature_info("tv:deeplabv3_resnet50", output_stride=8).reduction()[-1] == 8
    with pytest.raises(UnsupportedOptionError, match="output_stride= does not apply"):
        unifeat.create_model("tv:fasterrcnn_resnet50_fpn", output_stride=16)


def test_feature_info_of_a_detection_model_allocates_no_weights() -> None:
    """maskrcnn_resnet50_fpn_v2 holds 46 M parameters (177 MiB in fp32)."""
    code = (
        "import json, resource, time, torch, torchvision, unifeat\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        "info = unifeat.feature_info('tv:maskrcnn_resnet50_fpn_v2')\n"
        "seconds = time.perf_counter() - start\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
        "print(json.dumps(dict(grown_kib=grown, seconds=seconds, channels=info.channels())))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["channels"] == [64, 256, 512, 1024, 2048]
    assert report["grown_kib"] < 80 * 1024, report  # far below the weights' 177 MiB


# -- torchvision: the numbers ------------------------------------------------------------


def test_a_detection_checkpoint_loads_and_gives_its_body_outputs(
    fasterrcnn: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """The detection model's full checkpoint loads (its heads set aside) and the levels
    are what its own body computes, bit for bit: layer1..layer4 as its backbone.body
    returns them, the stem as torchvision's feature extractor reads it. The feature
    model holds the body under the detection model's names; its own state dict loads
    back, and a classification checkpoint is refused naming its keys."""
    reference, path = fasterrcnn
    model = unifeat.create_model(
        "tv:fasterrcnn_resnet50_fpn", features_only=True, checkpoint_path=path
    ).eval()
    x = torch.randn(*X64)
    with torch.no_grad():
        maps = model(x)
        body = reference.backbone.body(x)
        stem = create_feature_extractor(reference.backbone.body, ["relu"])(x)["relu"]
    assert torch.equal(maps[0], stem)
    for level, own in zip(maps[1:], body.values(), strict=True):
        assert torch.equal(level, own)
    names = list(model.state_dict())
    assert names[0] == "backbone.body.conv1.weight"
    assert all(name.startswith("backbone.body.") for name in names)
    assert isinstance(model.get_submodule("backbone.body.bn1"), FrozenBatchNorm2d)

    own = tmp_path / "features.pth"
    torch.save(model.state_dict(), own)
    unifeat.feature_info("tv:fasterrcnn_resnet50_fpn", checkpoint_path=own)  # checked on meta
    again = unifeat.create_model(
        "tv:fasterrcnn_resnet50_fpn", features_only=True, checkpoint_path=own
    ).eval()
    with torch.no_grad():
        for a, b in zip(maps, again(x), strict=True):
            assert torch.equal(a, b)
    classification = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), classification)
    with pytest.raises(CheckpointError, match=r"unexpected: conv1\.weight"):
        unifeat.feature_info("tv:fasterrcnn_resnet50_fpn", checkpoint_path=classification)


def test_fpn_outputs_are_nodes(fasterrcnn: tuple[nn.Module, Path]) -> None:
    """The FPN is traced into: each of its outputs is a node get_node_names lists, and
    return_nodes gives what the model's own backbone(x) gives."""
    reference, path = fasterrcnn
    _, nodes = unifeat.get_node_names("tv:fasterrcnn_resnet50_fpn")
    assert set(RCNN_FPN_NODES) <= set(nodes)
    model = unifeat.create_model(
        "tv:fasterrcnn_resnet50_fpn",
        features_only=True,
        checkpoint_path=path,
        return_nodes=RCNN_FPN_NODES,
    ).eval()
    x = torch.randn(*X64)
    with torch.no_grad():
        outputs = model(x)
        own = reference.backbone(x)
    # In depth order, as every output: the FPN computes P5 first.
    assert list(outputs) == ["3", "2", "1", "0", "pool"]
    for key, value in own.items():
        assert torch.equal(outputs[key], value), key
    assert model.feature_info.channels() == [256] * 5


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty torch hub cache: a weights file put there is what torchvision's
    ``weights.get_state_dict()`` reads instead of downloading."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    yield folder


def _cache(folder: Path, name: str, state_file: Path) -> None:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    shutil.copyfile(state_file, folder / os.path.basename(url))


def test_pretrained_loads_the_default_weights_into_the_same_model(
    fasterrcnn: tuple[nn.Module, Path], torch_home: Path
) -> None:
    """pretrained=True is torchvision's weights="DEFAULT" through its own builder; the
    model unifeat builds without them is the model torchvision loads them into (the
    same modules, FrozenBatchNorm2d with eps 0.0), so a checkpoint of them computes
    the same."""
    reference, path = fasterrcnn
    _cache(torch_home, "fasterrcnn_resnet50_fpn", path)
    weighted = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights="DEFAULT")
    without = unifeat.create_model("tv:fasterrcnn_resnet50_fpn", device="meta")
    assert type(without) is FasterRCNN
    assert _layout(without) == _layout(weighted)
    assert without.backbone.body.bn1.eps == weighted.backbone.body.bn1.eps == 0.0
    features = unifeat.create_model(
        "tv:fasterrcnn_resnet50_fpn", pretrained=True, features_only=True
    ).eval()
    # torchvision's builder freezes early stages with weights; a feature model trains
    # all it holds until frozen_levels says otherwise.
    assert all(p.requires_grad for p in features.parameters())
    x = torch.randn(*X64)
    with torch.no_grad():
        body = reference.backbone.body(x)
        for level, own in zip(features(x)[1:], body.values(), strict=True):
            assert torch.equal(level, own)


def _layout(model: nn.Module) -> list[tuple[str, str, Any]]:
    return [(n, type(m).__name__, getattr(m, "eps", None)) for n, m in model.named_modules()]


def test_segmentation_maps_are_the_models_own_backbone_outputs(tmp_path: Path) -> None:
    """DeepLabV3's dilated ResNet-50: levels 3 and 4 are what its backbone returns as
    "aux" and "out"; its checkpoint (with the auxiliary classifier) loads."""
    torch.manual_seed(0)
    reference = torchvision.models.get_model(
        "deeplabv3_resnet50", weights_backbone=None, aux_loss=True
    ).eval()
    path = tmp_path / "deeplabv3.pth"
    torch.save(reference.state_dict(), path)
    model = unifeat.create_model(
        "tv:deeplabv3_resnet50", features_only=True, out_indices=(3, 4), checkpoint_path=path
    ).eval()
    x = torch.randn(*X64)
    with torch.no_grad():
        aux, out = model(x)
        own = reference.backbone(x)
    assert torch.equal(aux, own["aux"]) and torch.equal(out, own["out"])
    assert out.shape[-1] == 8  # 64 / 8: dilated


def test_lraspp_and_ssdlite_maps_are_their_backbone_outputs(tmp_path: Path) -> None:
    """LR-ASPP reads its MobileNetV3's last map; SSDlite's backbone returns
    its two trunk maps and its extra layers' maps (nodes for return_nodes)."""
    torch.manual_seed(0)
    x = torch.randn(*X64)
    lraspp = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights_backbone=None)
    path = tmp_path / "lraspp.pth"
    torch.save(lraspp.eval().state_dict(), path)
    model = unifeat.create_model(
        "tv:lraspp_mobilenet_v3_large", features_only=True, checkpoint_path=path
    ).eval()
    with torch.no_grad():
        maps, own = model(x), lraspp.backbone(x)
    # LR-ASPP's "low" map is the first block of the stride-8 stage (a node), "high"
    # the last level: the stride-16 stage dilated.
    assert torch.equal(maps[4], own["high"]) and maps[2].shape == own["low"].shape

    ssdlite = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights_backbone=None)
    path = tmp_path / "ssdlite.pth"
    torch.save(ssdlite.eval().state_dict(), path)
    extra = {f"backbone.extra.{i}": str(i + 2) for i in range(4)}
    model = unifeat.create_model(
        "tv:ssdlite320_mobilenet_v3_large", features_only=True, checkpoint_path=path
    ).eval()
    nodes = unifeat.create_model(
        "tv:ssdlite320_mobilenet_v3_large",
        features_only=True,
        checkpoint_path=path,
        return_nodes=extra,
    ).eval()
    with torch.no_grad():
        maps, own, extras = model(x), ssdlite.backbone(x), nodes(x)
    assert torch.equal(maps[3], own["0"]) and torch.equal(maps[4], own["1"])
    for key, value in extras.items():
        assert torch.equal(value, own[key])


def test_a_detection_model_passed_in_is_read_and_left_alone() -> None:
    """A model instance is read as its backbone too (its own BatchNorm2d kept), sharing
    its tensors as any module passed in; the module keeps its structure and mode."""
    torch.manual_seed(0)
    detector = torchvision.models.get_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=None
    ).eval()
    modules = [(name, type(m)) for name, m in detector.named_modules()]
    model = unifeat.create_model(detector, features_only=True).eval()
    assert _levels(model.feature_info) == _levels(unifeat.feature_info("tv:mobilenet_v3_large"))
    x = torch.randn(*X64)
    with torch.no_grad():
        maps, own = model(x), detector.backbone.body(x)
    assert torch.equal(maps[-1], own["1"])
    model.train()
    assert not detector.training
    assert [(name, type(m)) for name, m in detector.named_modules()] == modules
    first = "backbone.body.0.0.weight"
    assert model.get_parameter(first) is detector.get_parameter(first)
    assert unifeat.create_model(detector) is detector


def test_a_detection_backbone_passed_in_has_its_body_levels() -> None:
    """torchvision's BackboneWithFPN by itself: the FPN reads every stage's output,
    which must not hide where the stages end (before, layer3's first ReLU came out
    as the stride-8 level)."""
    with torch.device("meta"):
        detector = torchvision.models.detection.retinanet_resnet50_fpn(weights_backbone=None)
    info = unifeat.feature_info(detector.backbone)
    assert _levels(info) == _levels(unifeat.feature_info("tv:resnet50"))
    assert info.module_name()[2] == "body.layer2"
    assert "fpn.extra_blocks.p6" in unifeat.get_node_names(detector.backbone)[1]


def test_a_segmentation_model_passed_in_has_its_undilated_levels() -> None:
    """An FCN built by hand is recognised as torchvision's ResNet-50 segmentation
    backbone, so its levels are ResNet-50's at stride 8, as by name."""
    with torch.device("meta"):
        fcn = torchvision.models.segmentation.fcn_resnet50(weights_backbone=None)
    assert _levels(unifeat.feature_info(fcn)) == _levels(
        unifeat.feature_info("tv:resnet50", output_stride=8)
    )


@pytest.mark.parametrize("name", ["ssd300_vgg16", "ssdlite320_mobilenet_v3_large"])
def test_data_config_normalizes_as_the_detection_models_transform(name: str) -> None:
    """The feature model skips the detection model's own transform, so its data config
    carries that transform's normalization (SSD300 takes 0-255 pixels minus a mean,
    SSDlite [-1, 1]) at the size it squashes images to: the same tensor."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    config = unifeat.data_config(f"tv:{name}")
    side = config.input_size[1]
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    with torch.device("meta"):
        detector = torchvision.models.get_model(name, weights_backbone=None)
    own = detector.transform.normalize(to_tensor(image))
    assert config.crop_mode == "squash"
    assert torch.equal(unifeat.create_transform(config)(image), own)


@pytest.mark.parametrize("name", ["tv:fasterrcnn_mobilenet_v3_large_320_fpn", "tv:inception_v3"])
def test_a_graph_calling_f_max_pool2d_pickles(name: str) -> None:
    """The FPN's pool level (and Inception's blocks) call F.max_pool2d, a function
    pickle cannot find by its qualified name: the feature model still pickles, in
    both modes, and runs after loading."""
    import io

    model = unifeat.create_model(name, features_only=True, device="meta")
    model.train()  # traces the train graph too
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _levels(loaded.feature_info) == _levels(model.feature_info)
    x = torch.empty(2, 3, 96, 96, device="meta")
    assert [m.shape for m in loaded.eval()(x)] == [m.shape for m in model.eval()(x)]


def test_detection_options_that_unifeat_decides_are_refused() -> None:
    with pytest.raises(UnsupportedOptionError, match="weights_backbone= is chosen by unifeat"):
        unifeat.feature_info("tv:fasterrcnn_resnet50_fpn", weights_backbone="DEFAULT")
    with pytest.raises(UnsupportedOptionError, match="frozen_levels=k"):
        unifeat.feature_info("tv:retinanet_resnet50_fpn", trainable_backbone_layers=3)
    with pytest.raises(UnsupportedOptionError, match="close matches: min_size"):
        unifeat.feature_info("tv:fasterrcnn_resnet50_fpn", min_sise=320)
    with pytest.raises(UnsupportedOptionError, match="close matches: aux_loss"):
        unifeat.feature_info("tv:fcn_resnet50", aux_los=False)
    with pytest.raises(InvalidNodeError, match=r"backbone\.fpn"):
        unifeat.feature_info("tv:fasterrcnn_resnet50_fpn", return_nodes=["fpn.layer_blocks.0"])


def test_num_classes_is_the_detection_builders_own() -> None:
    """With features_only=False, num_classes= sizes torchvision's heads."""
    model = unifeat.create_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    with pytest.raises(UnsupportedOptionError, match="global_pool= does not apply"):
        unifeat.create_model("tv:fcn_resnet50", global_pool="avg")


@pytest.mark.parametrize("name", DETECTION + SEGMENTATION)
def test_every_model_is_read_as_its_default_weights_have_it(
    name: str, tmp_path: Path, torch_home: Path
) -> None:
    """For all 18 models: a state dict in the layout of the DEFAULT weights, loaded by
    torchvision's own builder (weights="DEFAULT"), gives the model unifeat builds
    without weights (modules, norm eps); every level of the feature model loaded from
    it is what the module it names returns in that model's own backbone(x)."""
    torch.manual_seed(0)
    without = unifeat.create_model(f"tv:{name}")
    _randomize_frozen_norms(without)
    path = tmp_path / "weights.pth"
    torch.save(without.state_dict(), path)
    _cache(torch_home, name, path)
    weighted = torchvision.models.get_model(name, weights="DEFAULT").eval()
    assert _layout(without) == _layout(weighted)
    model = unifeat.create_model(f"tv:{name}", features_only=True, checkpoint_path=path).eval()
    modules = model.feature_info.module_name()
    outputs: dict[str, Tensor] = {}
    for module in modules:
        weighted.get_submodule(module).register_forward_hook(
            lambda _m, _a, out, module=module: outputs.__setitem__(module, out)
        )
    size = 320 if name.startswith("ssd") else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = model(x)
        weighted.backbone(x)
    for module, level in zip(modules, maps, strict=True):
        assert torch.equal(level, outputs[module]), module


# -- transformers ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DetrConfig,
    DetrForObjectDetection,
    Dinov2Config,
    DPTConfig,
    DPTForDepthEstimation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
    SwinConfig,
    TimmBackboneConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

STAGES = ["stage1", "stage2", "stage3", "stage4"]
RESNET = ResNetConfig(
    embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], out_features=STAGES
)
UPERNET = dict(hidden_size=16, auxiliary_in_channels=48, auxiliary_channels=8)
SWIN = SwinConfig(
    embed_dim=16,
    depths=[1, 1, 1, 1],
    num_heads=[1, 1, 2, 2],
    window_size=2,
    image_size=64,
    out_features=STAGES,
)
MASK2FORMER = dict(
    feature_size=32,
    mask_feature_size=32,
    hidden_dim=32,
    encoder_feedforward_dim=32,
    dim_feedforward=32,
    encoder_layers=1,
    decoder_layers=2,
    num_attention_heads=2,
    num_queries=4,
)
DETR = dict(
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=16,
    decoder_ffn_dim=16,
    num_queries=4,
)
VIT = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=64,
    patch_size=16,
)


def _output_of(module: nn.Module, run: Any) -> Tensor:
    """What ``module`` returns while ``run()`` runs the model it belongs to."""
    found: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: found.append(out))
    try:
        run()
    finally:
        handle.remove()
    return found[0]


def test_upernet_reads_its_resnet_backbone(tmp_path: Path) -> None:
    """UperNet's levels are its ResNet backbone's, as hf:resnet has them; the maps are
    its backbone's feature_maps (ResNet has no per-stage norm), the stem its stride-2
    convolution; its full checkpoint loads into hf:upernet by name, and a directory
    it was saved to loads with pretrained=True."""
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=RESNET, **UPERNET))
    model.eval()
    features = unifeat.create_model(model, features_only=True).eval()
    assert _levels(features.feature_info) == _levels(
        unifeat.feature_info("hf:resnet", config=RESNET)
    )
    assert features.feature_info.module_name()[1] == "backbone.encoder.stages.0"
    x = torch.randn(*X64)
    with torch.no_grad():
        maps = features(x)
        stem = _output_of(model.backbone.embedder.embedder, lambda: model.backbone(x))
        own = model.backbone(x).feature_maps
    assert torch.equal(maps[0], stem)
    for level, mine in zip(maps[1:], own, strict=True):
        assert torch.equal(level, mine)

    path = tmp_path / "upernet.pth"
    torch.save(model.state_dict(), path)
    by_name = unifeat.create_model(
        "hf:upernet", features_only=True, backbone_config=RESNET, checkpoint_path=path, **UPERNET
    ).eval()
    model.save_pretrained(tmp_path / "saved")
    saved = unifeat.create_model(f"hf:{tmp_path / 'saved'}", pretrained=True, features_only=True)
    with torch.no_grad():
        for level, a, b in zip(maps, by_name(x), saved.eval()(x), strict=True):
            assert torch.equal(level, a) and torch.equal(level, b)


def test_mask2former_reads_its_swin_backbone() -> None:
    """Mask2Former's levels are its Swin backbone's, as hf:swin has them: each stage's
    output before downsampling, which the backbone itself then passes through its
    per-stage norms to make feature_maps (return_nodes reach those norms)."""
    model = Mask2FormerForUniversalSegmentation(
        Mask2FormerConfig(backbone_config=SWIN, **MASK2FORMER)
    ).eval()
    features = unifeat.create_model(model, features_only=True).eval()
    assert _levels(features.feature_info) == _levels(unifeat.feature_info("hf:swin", config=SWIN))
    encoder = model.model.pixel_level_module.encoder
    x = torch.randn(*X64)
    with torch.no_grad():
        maps = features(x)
        own = encoder(x)
        for level, stage, mine in zip(maps, STAGES, own.feature_maps, strict=True):
            normed = encoder.hidden_states_norms[stage](level.permute(0, 2, 3, 1))
            assert torch.equal(normed.permute(0, 3, 1, 2).contiguous(), mine)
    nodes = [f"model.pixel_level_module.encoder.hidden_states_norms.{s}" for s in STAGES]
    normed = unifeat.create_model(model, features_only=True, return_nodes=nodes).eval()
    with torch.no_grad():
        tokens = list(normed(x).values())
    for mine, token in zip(own.feature_maps, tokens, strict=True):
        assert torch.equal(token.transpose(1, 2).reshape(mine.shape), mine)


def test_detr_reads_its_timm_backbone_and_downloads_nothing() -> None:
    """DETR's backbone is a timm features_only ResNet with frozen norms: its levels are
    timm's ResNet's (stem included), its maps what the model's own backbone returns. A
    config asking the backbone for pretrained weights builds without them."""
    backbone = TimmBackboneConfig(backbone="resnet18", out_indices=[1, 2, 3, 4])
    model = DetrForObjectDetection(DetrConfig(backbone_config=backbone, **DETR)).eval()
    features = unifeat.create_model(model, features_only=True).eval()
    assert _levels(features.feature_info) == _levels(unifeat.feature_info("timm:resnet18"))
    x = torch.randn(*X64)
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    with torch.no_grad():
        maps = features(x)
        own = model.model.backbone(x, mask)
        stem = _output_of(model.model.backbone.model.act1, lambda: model.model.backbone(x, mask))
    assert torch.equal(maps[0], stem)
    for level, (mine, _mask) in zip(maps[1:], own, strict=True):
        assert torch.equal(level, mine)
    asks = TimmBackboneConfig(backbone="resnet18", use_pretrained_backbone=True)
    info = unifeat.feature_info("hf:detr", backbone_config=asks, **DETR)
    assert _levels(info) == _levels(unifeat.feature_info("timm:resnet18"))
    assert asks.use_pretrained_backbone  # the caller's config is not changed


def test_dpt_reads_its_own_vit() -> None:
    """DPT's backbone is its own ViT: one level per block at its patch size, as hf:vit
    has them, the maps its hidden states without the class token."""
    model = DPTForDepthEstimation(
        DPTConfig(
            **VIT,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
            reassemble_factors=[4, 2, 1, 0.5],
        )
    ).eval()
    features = unifeat.create_model(model, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert _levels(features.feature_info) == _levels(
        unifeat.feature_info("hf:vit", **VIT, out_indices=(0, 1, 2, 3))
    )
    assert unifeat.feature_info("hf:dpt", **VIT).out_indices == (1, 2, 3)  # the last 3 blocks
    x = torch.randn(*X64)
    with torch.no_grad():
        maps = features(x)
        hidden = model.dpt(x, output_hidden_states=True).hidden_states[1:]
    for level, tokens in zip(maps, hidden, strict=True):
        assert torch.equal(level, tokens[:, 1:].transpose(1, 2).reshape(level.shape))


def test_depth_anything_reads_its_dinov2_backbone() -> None:
    """Depth Anything's DINOv2 backbone: hf:dinov2's levels; with norm=True, the
    backbone's own feature_maps (its final layernorm on every block it reads)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    dinov2 = Dinov2Config(
        **{**VIT, "intermediate_size": None},
        mlp_ratio=2,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=True,
    )
    model = DepthAnythingForDepthEstimation(
        DepthAnythingConfig(
            backbone_config=dinov2,
            reassemble_hidden_size=32,
            neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
            patch_size=16,
        )
    ).eval()
    every = (0, 1, 2, 3)
    features = unifeat.create_model(model, features_only=True, out_indices=every, norm=True)
    assert _levels(features.feature_info) == _levels(
        unifeat.feature_info("hf:dinov2", config=dinov2, out_indices=every)
    )
    x = torch.randn(*X64)
    with torch.no_grad():
        maps = features.eval()(x)
        own = model.backbone(x).feature_maps
    for level, mine in zip(maps, own, strict=True):
        # The same layernorm, over the tokens there and the map here: float rounding.
        torch.testing.assert_close(level, mine, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "backbone_type"),
    [
        ("upernet", "resnet"),
        ("mask2former", "swin"),
        ("oneformer", "swin"),
        ("rt_detr", "rt_detr_resnet"),
        ("vitpose", "vitpose_backbone"),
    ],
)
def test_default_configs_have_their_backbone_types_levels(
    model_type: str, backbone_type: str
) -> None:
    """By type name, a task model's default config gives the levels its default
    backbone config has built directly (on the meta device)."""
    from transformers import AutoConfig

    backbone = AutoConfig.for_model(model_type).backbone_config
    assert backbone.model_type == backbone_type
    assert _levels(unifeat.feature_info(f"hf:{model_type}")) == _levels(
        unifeat.feature_info(f"hf:{backbone_type}", config=backbone)
    )


# Every transformers 5.23 model type whose config has a backbone_config, on its
# default config: the levels it gives, or why it is refused.
TASK_TYPES_WITH_LEVELS = {
    "chmv2": (24, (1024, 16)),
    "conditional_detr": (5, (2048, 32)),
    "d_fine": (5, (2048, 32)),
    "dab-detr": (5, (2048, 32)),
    "deformable_detr": (5, (2048, 32)),
    "deimv2": (5, (2048, 32)),
    "depth_anything": (12, (384, 14)),
    "detr": (5, (2048, 32)),
    "edgetam_vision_model": (5, (2048, 32)),
    "grounding-dino": (4, (768, 32)),
    "lw_detr": (10, (192, 16)),
    "mask2former": (4, (768, 32)),
    "maskformer": (4, (1024, 32)),
    "mm-grounding-dino": (4, (768, 32)),
    "omdet-turbo": (4, (768, 32)),
    "oneformer": (4, (768, 32)),
    "pp_doclayout_v2": (5, (2048, 32)),
    "pp_doclayout_v3": (5, (2048, 32)),
    "pp_doclayout_v4": (5, (2048, 32)),
    "pp_ocrv5_mobile_det": (5, (384, 32)),
    "pp_ocrv5_mobile_rec": (5, (384, 32)),
    "prompt_depth_anything": (12, (384, 14)),
    "rt_detr": (5, (2048, 32)),
    "rt_detr_v2": (5, (2048, 32)),
    "slanet": (5, (512, 32)),
    "table-transformer": (5, (2048, 32)),
    "tipsv2_dpt": (12, (768, 14)),
    "tvp": (5, (2048, 32)),
    "upernet": (5, (2048, 32)),
    "uvdoc": (4, (128, 16)),
    "vitpose": (12, (768, 16)),
    "zoedepth": (24, (1024, 16)),
}
TASK_TYPES_REFUSED = {
    "pp_ocrv5_server_det": "could not build",  # its default config builds nothing
    "pp_ocrv6_medium_det": "could not build",
    "vitmatte": "could not build",
    "pp_ocrv5_server_rec": "different factors",  # text-line backbones: H and W differ
    "pp_ocrv6_small_det": "different factors",
    "pp_ocrv6_small_rec": "different factors",
    "pp_ocrv6_tiny_rec": "different factors",
    "rf_detr": "could not run",  # windowed DINOv2: 518 is no multiple of its windows
}
# Hiera-Det and SAM 3's ViT blocks return channels-last maps: SAM 2's four stages, SAM 3's
# plain ViT of 32 blocks.
TASK_TYPES_CHANNELS_LAST = {
    "sam2_vision_model": (4, (768, 32)),
    "sam3_vision_model": (32, (1024, 14)),
}


def test_every_type_with_a_backbone_config_is_covered() -> None:
    """The survey the docs' coverage table reports (docs/backends/hf.md)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with_backbone = set()
    for model_type in CONFIG_MAPPING:
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:
            continue
        if getattr(config, "backbone_config", None) is not None:
            with_backbone.add(model_type)
    known = {*TASK_TYPES_WITH_LEVELS, *TASK_TYPES_REFUSED, *TASK_TYPES_CHANNELS_LAST}
    levels = {**TASK_TYPES_WITH_LEVELS, **TASK_TYPES_CHANNELS_LAST}
    assert with_backbone == known
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type, (count, last) in levels.items():
            info = unifeat.feature_info(f"hf:{model_type}")
            assert (len(info), _levels(info)[-1]) == (count, last), model_type
        for model_type, reason in TASK_TYPES_REFUSED.items():
            with pytest.raises(UnsupportedOptionError, match=reason):
                unifeat.feature_info(f"hf:{model_type}")


@pytest.mark.parametrize("model_type", ["sam2_vision_model"])
def test_channels_last_backbones_have_their_stages(model_type: str) -> None:
    """Blocks that return channels-last maps (SAM 2's Hiera) are read as levels, and the
    model's code after them (its neck reads their outputs' fields) never runs: a call
    ends at the deepest level. The maps equal the backbone's own intermediate states."""
    count, last = TASK_TYPES_CHANNELS_LAST[model_type]
    info = unifeat.feature_info(f"hf:{model_type}", input_size=64)
    assert (len(info), _levels(info)[-1]) == (count, last)
    model = unifeat.create_model(f"hf:{model_type}", features_only=True, input_size=64).eval()
    native = model.get_submodule("backbone")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model(x)
        states = native(x).intermediate_hidden_states
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, 64 // r, 64 // r) for c, r in zip(info.channels(), info.reduction(), strict=True)
    ]
    for ours, theirs in zip(maps, states, strict=True):
        torch.testing.assert_close(ours, theirs.permute(0, 3, 1, 2), rtol=0, atol=0)
