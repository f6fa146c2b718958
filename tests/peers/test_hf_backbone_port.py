"""transformers' backbone tests (``tests/test_backbone_common.py``'s
``BackboneTesterMixin``, ``tests/utils/test_backbone_utils.py``, and the
``out_indices`` / ``out_features`` rules of ``utils/backbone_utils.py``), ported to
run against unifeat as a black box on every backend they apply to.

transformers' backbones name their levels ``stage_names`` (``"stem"``,
``"stage1"``, ...), select them with ``out_indices`` or ``out_features`` and report
``channels``; unifeat's counterparts are ``feature_info`` (levels, channels,
module names), ``out_indices``, and ``return_nodes`` with module paths. Where
the semantics deliberately differ (the default selection, stem numbering,
negative indices kept as given, order errors) the test asserts unifeat's
documented behaviour and its docstring says what transformers asserts and where
the docs say why. The maps themselves are compared with transformers' own
``*Backbone`` classes, with the same weights.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers
from torch import nn

import unifeat
from tests.peers._models import (
    HF_CONVNEXT,
    HF_RESNET,
    HF_SWIN,
    HF_TOKENS,
    Case,
    params,
)


def _all(info: unifeat.FeatureInfo) -> list[int]:
    return list(range(len(info)))


# -- test_config / test_backbone_common_attributes: stage names and the default selection ---


@pytest.mark.parametrize(
    "case",
    params(),
)
def test_stage_names_and_default_selection(case: Case) -> None:
    """Ports ``test_config``'s stage names and defaults and
    ``test_backbone_common_attributes``.

    transformers asserts ``stage_names == ["stem", "stage1", ...]`` and that with
    neither ``out_features`` nor ``out_indices`` only the last stage is returned.
    unifeat's levels are the architecture's, named by the source's module paths
    (docs/levels.md#the-same-levels-in-every-backend), and the default selection is
    every level of a hierarchical net, the last 3 blocks of a plain ViT
    (docs/levels.md#the-index-rule). As there, there is one name and one channel
    count per level, and the selection is a subset of the levels.
    """
    info = case.info()
    names = info.module_name(_all(info))
    source = case.source()
    assert len(names) == len(set(names)) == len(info) == len(info.channels(_all(info)))
    for name in names:
        source.get_submodule(name)  # a module path of the source
    n = len(info)
    expected = tuple(range(n - 3, n)) if case.tokens else tuple(range(n))
    assert info.out_indices == expected
    assert set(info.module_name()) <= set(names)
    assert len(info.channels()) == len(info.out_indices) <= len(info)


@pytest.mark.parametrize("case", params())
def test_out_indices_select_and_align(case: Case) -> None:
    """Ports ``test_config``'s "only out_indices set" and ``test_backbone_utils``'
    ``test_get_aligned_output_features_output_indices``: ``out_indices=[0, 2]`` selects
    levels 0 and 2 (their names and channels follow), ``[-3, -1]`` the third-last and
    the last. transformers keeps ``[-3, -1]`` as given in ``out_indices``; unifeat
    normalizes them (docs/levels.md#the-index-rule: ``feature_info.out_indices`` holds
    the normalized tuple)."""
    info = case.info()
    n = len(info)
    picked = case.info(out_indices=[0, 2])
    assert picked.out_indices == (0, 2)
    assert picked.module_name() == info.module_name([0, 2])
    assert picked.channels() == info.channels([0, 2])
    negative = case.info(out_indices=[-3, -1])
    assert negative.out_indices == (n - 3, n - 1)
    assert negative.module_name() == info.module_name([n - 3, n - 1])


@pytest.mark.parametrize("case", params())
def test_out_indices_validation(case: Case) -> None:
    """Ports ``test_verify_out_features_out_indices``' index checks and the config's
    ``ValueError``s: an index past the last level, and a duplicate, are
    ``ValueError``s in both (unifeat's ``InvalidIndicesError`` is one).
    transformers also refuses indices out of stage order and a bare int; unifeat
    sorts into depth order and reads an int ``n`` as the last ``n`` levels
    (docs/levels.md#the-index-rule), refusing ``0``."""
    n = len(case.info())
    for bad in ([n], [0, 0], [-1, n - 1], 0):
        with pytest.raises(ValueError) as error:
            case.info(out_indices=bad)
        assert isinstance(error.value, unifeat.InvalidIndicesError)
    assert case.info(out_indices=[2, 0]).out_indices == (0, 2)
    assert case.info(out_indices=1).out_indices == (n - 1,)


@pytest.mark.parametrize(
    "case",
    params(
        # A transformers Swin stage returns a tuple (hidden states after and before
        # its downsampling) and return_nodes gives it as it is (docs/node-names.md);
        # its level is the second, as tokens: no like-for-like comparison here.
        where=lambda case: not case.tokens and case.id != "hf-swin",
    ),
)
def test_out_features_match_out_indices(case: Case) -> None:
    """Ports ``test_config``'s ``out_features`` / ``out_indices`` alignment: naming the
    levels (transformers' ``out_features=["stage1", "stage3"]``; here their module
    paths in ``return_nodes``) gives the same maps as their indices (nodes come as
    they are, so Swin's are NHWC: docs/node-names.md), and asking for
    both is a ``ValueError`` (transformers: when they disagree; unifeat: always,
    ``return_nodes`` does not combine with ``out_indices``: docs/node-names.md)."""
    source = case.source().eval()
    info = case.info()
    names = info.module_name([0, 2])
    by_name = case.build(source, return_nodes=names, output_type="list").eval()
    by_index = case.build(source, out_indices=[0, 2]).eval()
    x = case.input()
    with torch.no_grad():
        for named, indexed in zip(by_name(x), by_index(x), strict=True):
            if named.shape != indexed.shape:  # nodes come as they are: Swin's NHWC
                named = named.permute(0, 3, 1, 2)
            torch.testing.assert_close(named, indexed, rtol=0, atol=0)
    with pytest.raises(ValueError):
        case.build(source, return_nodes=names, out_indices=[0, 2])


# -- test_channels / test_create_from_modified_config / test_backbone_outputs --------------


@pytest.mark.parametrize("case", params())
def test_channels(case: Case) -> None:
    """Ports ``test_channels``: the channels reported are those of the selected levels,
    ``num_features[i]`` for each selected ``i`` (here ``channels()`` over all levels);
    a single selected level reports the last level's channels."""
    info = case.info(out_indices=[0, 2])
    every = info.channels(_all(info))
    assert info.channels() == [every[0], every[2]]
    last = case.info(out_indices=[-1])
    assert last.channels() == [every[-1]]


@pytest.mark.parametrize("case", params())
def test_create_from_modified_config(case: Case) -> None:
    """Ports ``test_create_from_modified_config``: as many maps as selected levels and
    reported channels, for the default selection and for the last level alone."""
    x = case.input()
    for out_indices in (None, [-1]):
        model = case.build(out_indices=out_indices).eval()
        with torch.no_grad():
            maps = model(x)
        assert (
            len(maps) == len(model.feature_info.out_indices) == len(model.feature_info.channels())
        )
    assert len(maps) == 1


@pytest.mark.parametrize("case", params())
def test_backbone_outputs(case: Case) -> None:
    """Ports ``test_backbone_outputs``: the feature maps come as a sequence (a tuple in
    transformers, a list in unifeat: docs/levels.md), one per selected level, each
    ``shape[:2] == (batch, channels)`` (transformers' test wraps this in
    ``assertTrue``, which always passes; here it is asserted), at the level's
    (nominal) reduction."""
    model = case.build(out_indices=len(case.info())).eval()
    x = case.input()
    with torch.no_grad():
        maps = model(x)
    assert isinstance(maps, list)
    info = model.feature_info
    assert len(maps) == len(info.channels())
    for feature_map, channels, reduction in zip(
        maps, info.channels(), info.reduction(), strict=True
    ):
        assert tuple(feature_map.shape[:2]) == (x.shape[0], channels)
        # Nominal reductions: valid-padding stems are a pixel off (docs/feature-info.md).
        for side in feature_map.shape[2:]:
            assert case.size // reduction - 1 <= side <= math.ceil(case.size / reduction) + 1


@pytest.mark.parametrize("case", params())
def test_forward_signature(case: Case) -> None:
    """Ports ``test_forward_signature`` (the first argument is ``pixel_values``): a
    feature model's forward takes the images as its one required argument, and
    positionally."""
    model = case.build().eval()
    required = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert len(required) == 1


# -- the maps against transformers' own *Backbone classes --------------------------------------


def _backbone(config_class: type, backbone_class: type, kwargs: dict, **extra) -> nn.Module:
    config = config_class(**kwargs, **extra)
    config = config_class(**kwargs, **extra, out_features=list(config.stage_names))
    return backbone_class(config).eval()


def _load_trunk(backbone: nn.Module, model: nn.Module) -> None:
    """The feature model's weights (the base model's keys) into a ``*Backbone``: only
    the backbone's own extra norms and what no level reads (DINOv2's mask token, a
    feature model holds neither: docs/training.md) are left out."""
    missing, unexpected = backbone.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    assert all("norm" in key or key.endswith("mask_token") for key in missing), missing


def test_resnet_maps_equal_resnet_backbone() -> None:
    """transformers' ``ResNetBackbone`` stages ``stage1``..``stage4`` are unifeat's
    levels 1..4, value for value. Its ``stem`` is the embedding after the max-pool
    (reduction 4); unifeat's level 0 is the stride-2 stem before it, as in timm and
    torchvision (docs/backends/hf.md#levels)."""
    model = unifeat.create_model("hf:resnet", features_only=True, **HF_RESNET).eval()
    backbone = _backbone(transformers.ResNetConfig, transformers.ResNetBackbone, HF_RESNET)
    _load_trunk(backbone, model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), backbone(x).feature_maps
    assert backbone.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert model.feature_info.channels()[1:] == backbone.channels[1:]
    for level in range(1, 5):
        torch.testing.assert_close(ours[level], theirs[level], rtol=0, atol=0)
    assert model.feature_info.reduction()[:1] == [2]
    assert theirs[0].shape[-1] == 64 // 4 and ours[0].shape[-1] == 64 // 2


def test_convnext_maps_equal_convnext_backbone_without_its_extra_norms() -> None:
    """transformers' ``ConvNextBackbone`` stages are unifeat's levels, once the
    per-stage norms the backbone adds (and the base model and its classification
    checkpoints do not have) are taken out: unifeat returns the base model's stage
    outputs, so that ``hf:``, ``timm:`` and ``tv:`` agree (docs/backends/hf.md#levels).
    Its ``stem`` (the patch embedding) is no level: the first stage keeps its
    reduction."""
    model = unifeat.create_model("hf:convnext", features_only=True, **HF_CONVNEXT).eval()
    backbone = _backbone(transformers.ConvNextConfig, transformers.ConvNextBackbone, HF_CONVNEXT)
    _load_trunk(backbone, model)
    backbone.hidden_states_norms = nn.ModuleDict(
        {name: nn.Identity() for name in backbone.hidden_states_norms}
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), backbone(x).feature_maps
    assert len(ours) == len(theirs) - 1
    for level, feature_map in enumerate(ours):
        torch.testing.assert_close(feature_map, theirs[level + 1], rtol=0, atol=0)


def test_dinov2_maps_equal_dinov2_backbone() -> None:
    """transformers' ``Dinov2Backbone`` (``apply_layernorm=False``) stage ``k`` is the
    output of block ``k - 1`` as a map: unifeat's level ``k - 1``, value for value
    (index ``i`` is block ``i``, not ``AutoBackbone``'s stage ``i`` whose ``stem`` is
    0: docs/backends/hf.md#levels)."""
    # Dinov2Config sizes its MLP by mlp_ratio; it has no intermediate_size field.
    config = {**{k: v for k, v in HF_TOKENS.items() if k != "intermediate_size"}, "mlp_ratio": 2}
    model = unifeat.create_model("hf:dinov2", features_only=True, out_indices=4, **config).eval()
    backbone = _backbone(
        transformers.Dinov2Config, transformers.Dinov2Backbone, config, apply_layernorm=False
    )
    _load_trunk(backbone, model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), backbone(x).feature_maps
    assert len(ours) == len(theirs) - 1 == 4
    for level, feature_map in enumerate(ours):
        torch.testing.assert_close(feature_map, theirs[level + 1], rtol=0, atol=0)


def test_swin_maps_equal_swin_backbone_without_its_extra_norms() -> None:
    """As for ConvNeXt: ``SwinBackbone``'s stages without the norms it adds are
    unifeat's levels (the stage output before downsampling, as timm's)."""
    model = unifeat.create_model("hf:swin", features_only=True, **HF_SWIN).eval()
    backbone = _backbone(transformers.SwinConfig, transformers.SwinBackbone, HF_SWIN)
    state = model.state_dict()
    own = set(backbone.state_dict())
    state = {(k if k in own else f"swin.{k}"): v for k, v in state.items()}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    assert not unexpected and all("norm" in key for key in missing), missing
    backbone.hidden_states_norms = nn.ModuleDict(
        {name: nn.Identity() for name in backbone.hidden_states_norms}
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), backbone(x).feature_maps
    assert len(ours) == len(theirs) - 1
    for level, feature_map in enumerate(ours):
        torch.testing.assert_close(feature_map, theirs[level + 1])


def test_deepest_1x1_map_is_a_level() -> None:
    """transformers' ``ConvNextBackbone`` at ``image_size=32`` returns its last stage
    as a 1x1 map; it is a level in unifeat too, with the same values."""
    kwargs = dict(HF_CONVNEXT, image_size=32)
    info = unifeat.feature_info("hf:convnext", **kwargs)
    assert info.reduction(_all(info)) == [4, 8, 16, 32]
    model = unifeat.create_model("hf:convnext", features_only=True, **kwargs).eval()
    backbone = _backbone(transformers.ConvNextConfig, transformers.ConvNextBackbone, kwargs)
    _load_trunk(backbone, model)
    backbone.hidden_states_norms = nn.ModuleDict(
        {name: nn.Identity() for name in backbone.hidden_states_norms}
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x), backbone(x).feature_maps
    assert ours[-1].shape == theirs[-1].shape == (1, 32, 1, 1)
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=0, atol=0)
