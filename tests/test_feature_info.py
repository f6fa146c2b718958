"""FeatureInfo: timm-compatible accessors, validation, JSON round trip (docs/feature-info.md)."""

from __future__ import annotations

import json

import pydantic
import pytest
import timm
import torch

import unifeat
from unifeat import FeatureInfo, FeatureLevel

RESNET50_LEVELS = [(64, 2), (256, 4), (512, 8), (1024, 16), (2048, 32)]


def test_resnet50_levels_are_the_canonical_ones():
    info = unifeat.feature_info("resnet50")
    assert (
        list(zip(info.channels(range(5)), info.reduction(range(5)), strict=True)) == RESNET50_LEVELS
    )
    assert info.module_name() == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert info.out_indices == (0, 1, 2, 3, 4)


def test_accessors_behave_like_timms():
    ours = unifeat.feature_info("resnet50", out_indices=(1, 2, 3, 4))
    with torch.device("meta"):
        theirs = timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    theirs = theirs.feature_info
    assert ours.channels() == theirs.channels() == [256, 512, 1024, 2048]
    assert ours.reduction() == theirs.reduction()
    assert ours.module_name() == theirs.module_name()
    assert ours.channels(0) == theirs.channels(0) == 64
    assert ours.channels([0, 4]) == theirs.channels([0, 4])
    assert len(ours) == len(theirs) == 5
    assert ours[2]["num_chs"] == theirs[2]["num_chs"] == 512
    assert ours.get_dicts(keys=["num_chs"]) == theirs.get_dicts(keys=["num_chs"])
    assert ours.get_dicts(idx=1)["module"] == "layer1"
    assert [level["module"] for level in ours] == [d["module"] for d in theirs.info]
    assert ours.out_indices == tuple(theirs.out_indices)


def test_json_round_trip_keeps_every_field():
    info = unifeat.feature_info("timm:vit_tiny_patch16_224")
    text = info.model_dump_json()
    assert json.loads(text)["out_indices"] == [9, 10, 11]
    again = FeatureInfo.model_validate_json(text)
    assert again == info
    assert again.channels() == [192, 192, 192]
    assert isinstance(again[0], FeatureLevel)


def test_extra_fields_survive_and_are_readable():
    info = FeatureInfo.from_dicts(
        [
            dict(num_chs=8, reduction=2, module="a", stage=0),
            dict(num_chs=16, reduction=4, module="b", stage=1),
        ]
    )
    assert info.get("stage") == [0, 1]
    assert FeatureInfo.model_validate_json(info.model_dump_json()).get("stage") == [0, 1]
    assert info[1].get("missing", "default") == "default"
    with pytest.raises(KeyError):
        info[1]["missing"]


def test_from_other_normalizes():
    info = unifeat.feature_info("resnet18")
    assert info.from_other((-1, 1)).out_indices == (1, 4)
    with pytest.raises(unifeat.InvalidIndicesError):
        info.from_other((9,))


@pytest.mark.parametrize(
    "bad",
    [
        dict(levels=(), out_indices=()),
        dict(levels=(FeatureLevel(index=1, num_chs=1, reduction=1, module="x"),), out_indices=(0,)),
        dict(levels=(FeatureLevel(index=0, num_chs=1, reduction=1, module="x"),), out_indices=(1,)),
        dict(
            levels=(
                FeatureLevel(index=0, num_chs=1, reduction=1, module="x"),
                FeatureLevel(index=1, num_chs=1, reduction=1, module="y"),
            ),
            out_indices=(1, 0),
        ),
    ],
)
def test_inconsistent_info_is_rejected(bad):
    with pytest.raises((pydantic.ValidationError, unifeat.InvalidIndicesError)):
        FeatureInfo(**bad)


def test_feature_info_is_the_feature_models():
    """feature_info() (meta device) and a built model agree, for options too."""
    for name, kwargs in [
        ("resnet18", dict(out_indices=2)),
        ("convnext_atto", dict(output_stride=16)),
        ("vit_tiny_patch16_224", dict(img_size=64, out_indices=(0, -1))),
    ]:
        described = unifeat.feature_info(name, **kwargs)
        built = unifeat.create_model(name, features_only=True, **kwargs).feature_info
        assert described == built
