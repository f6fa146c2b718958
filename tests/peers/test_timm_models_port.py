"""timm's own feature-extraction tests (``tests/test_models.py``, ``tests/test_prune.py``
of huggingface/pytorch-image-models), ported to run against unifeat as a black box
on every backend they apply to.

timm checks its models one by one over ``list_models()``; here each check runs on
small random-init models of every backend (``tests/peers/_models.py``). Where
unifeat deliberately differs from timm the test asserts unifeat's documented
behaviour and its docstring says what timm asserts and which docs page says why.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import unifeat
from tests.peers._models import (
    BY_ID,
    Case,
    capture,
    first_tensor,
    grad_numel,
    params,
    run_source,
)


def _spatial_axes(output_fmt: str) -> tuple[int, tuple[int, int]]:
    return (1, (2, 3)) if output_fmt == "NCHW" else (3, (1, 2))


def _check_maps(maps, channels, reductions, size, batch, output_fmt="NCHW") -> None:
    """The per-map assertions timm's feature tests share."""
    feat_axis, (h_axis, w_axis) = _spatial_axes(output_fmt)
    assert len(maps) == len(channels)
    for expected, reduction, out in zip(channels, reductions, maps, strict=True):
        assert out.shape[feat_axis] == expected
        assert out.shape[h_axis] <= math.ceil(size / reduction) + 1
        assert out.shape[w_axis] <= math.ceil(size / reduction) + 1
        assert out.shape[0] == batch
        assert not torch.isnan(out).any()


# -- test_model_forward_features / test_model_forward_intermediates_features ------------


@pytest.mark.parametrize("output_fmt", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", params())
def test_forward_features(case: Case, output_fmt: str) -> None:
    """Ports timm's ``test_model_forward_features``: a features_only model with the
    default levels gives at least 3 maps, one per ``feature_info.channels()``, with
    those channels on the format's channel axis, at most ``ceil(size / reduction) + 1``
    wide, the batch size kept, and no NaN."""
    model = case.build(output_fmt=output_fmt).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    assert len(channels) >= 3
    with torch.no_grad():
        outputs = model(case.input(batch=1))
    _check_maps(outputs, channels, reductions, case.size, 1, output_fmt)


@pytest.mark.parametrize("case", params())
def test_forward_intermediates_features(case: Case) -> None:
    """Ports timm's ``test_model_forward_intermediates_features`` (features_only with
    ``feature_cls='getter'``, i.e. every level through ``forward_intermediates``):
    asking for every level gives one map per level with its channels and size."""
    levels = len(case.info())
    model = case.build(out_indices=levels).eval()
    assert model.feature_info.out_indices == tuple(range(levels))
    with torch.no_grad():
        outputs = model(case.input(batch=1))
    info = model.feature_info
    _check_maps(outputs, info.channels(), info.reduction(), case.size, 1)


# -- test_model_forward_intermediates ----------------------------------------------------


@pytest.mark.parametrize("case", params())
def test_forward_intermediates(case: Case) -> None:
    """Ports the intermediates half of timm's ``test_model_forward_intermediates``:
    ``final, intermediates = forward_intermediates(x, output_fmt='NCHW')`` gives at
    least 3 maps (every level here), each with its level's channels and size.
    (timm calls it on the full model; unifeat's feature models have the method and
    ``indices=None`` means their ``out_indices``: docs/levels.md#the-index-rule.)"""
    levels = len(case.info())
    model = case.build(out_indices=levels).eval()
    info = model.feature_info
    assert len(info.channels()) >= 3
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(case.input(batch=1), output_fmt="NCHW")
    assert isinstance(final, torch.Tensor) and final.shape[0] == 1
    _check_maps(intermediates, info.channels(), info.reduction(), case.size, 1)


@pytest.mark.parametrize(
    "case",
    params(
        where=lambda case: case.backend == "timm" or case.final_module is not None,
    ),
)
def test_forward_intermediates_final_is_forward_features(case: Case) -> None:
    """Ports the last assertion of timm's ``test_model_forward_intermediates``: the
    final output of ``forward_intermediates`` equals the model's own
    ``forward_features(x)`` (timm), or its analogue, the unpooled output of the
    source's final feature module (torchvision, transformers, plain modules) —
    after the final norm, in the model's native layout. A feature model holds that
    final norm when built with ``norm=True``, as timm's getter feature models do
    (docs/levels.md#the-final-output-of-forward_intermediates); where ``norm=True``
    is refused (no final norm; EfficientNet's head conv is no norm), the final output
    is the deepest level's block output, as timm's pruned model gives it."""
    source = case.source().eval()
    levels = len(case.info())
    try:
        model = case.build(source, out_indices=levels, norm=True).eval()
        kept = True
    except unifeat.UnsupportedOptionError:
        model = case.build(source, out_indices=levels).eval()
        kept = False
    x = case.input()
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        if kept or case.backend != "timm":
            expected = case.forward_features(source, x)
        else:
            reference = copy.deepcopy(source)
            reference.prune_intermediate_layers(levels, prune_norm=True)
            expected = reference.forward_intermediates(x, indices=levels)[0]
    assert final.shape == expected.shape
    torch.testing.assert_close(final, expected)


@pytest.mark.parametrize(
    "case",
    params(
        # transformers' Swin stages downsample inside the stage module, so its output
        # is not the level; which "native layout" its final output has is open.
        where=lambda case: case.id != "hf-swin",
    ),
)
def test_forward_intermediates_after_pruning(case: Case) -> None:
    """Ports timm's pruning semantics (``prune_intermediate_layers`` then
    ``forward_intermediates``, as timm's getter feature models use them): once pruned
    to level 1, the intermediates are those of the unpruned model, and with
    ``prune_norm=True`` the final output is the output of level 1's block in the
    native layout. Asking for a pruned level is an error (timm would return the
    output of the ``Identity`` left in its place: docs/levels.md#indices-on-pruned-models)."""
    source = case.source().eval()
    model = case.build(source, out_indices=len(case.info())).eval()
    x = case.input()
    with torch.no_grad():
        full = model(x)
        assert model.prune_intermediate_layers((0, 1), prune_norm=True) == [0, 1]
        final, intermediates = model.forward_intermediates(x)
        block = model.feature_info.module_name(1)
        with capture(source, [block]) as seen:
            run_source(source, x)
    assert len(intermediates) == 2
    for got, expected in zip(intermediates, full[:2], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(final, first_tensor(seen[block]), rtol=0, atol=0)
    with pytest.raises(unifeat.InvalidIndicesError, match="pruned"):
        model.forward_intermediates(x, indices=(2,))


@pytest.mark.parametrize("case", params(where=lambda case: case.backend == "timm"))
def test_pruned_final_output_is_timms(case: Case) -> None:
    """Without ``prune_norm`` timm keeps the final norm after pruning and applies it
    to the final output (docs/levels.md): the same call on timm's own model gives
    the same tensors, for a feature model that keeps the norm (``norm=True``)."""
    source = case.source().eval()
    reference = copy.deepcopy(source)
    try:
        model = case.build(source, out_indices=len(case.info()), norm=True).eval()
        kept = True
    except unifeat.UnsupportedOptionError as refused:  # no final norm that fits a level
        assert "norm=True would change none" in str(refused)
        model = case.build(source, out_indices=len(case.info())).eval()
        kept = False
    x = case.input()
    with torch.no_grad():
        model.prune_intermediate_layers((0, 1))
        final, maps = model.forward_intermediates(x)
        # Without the norm kept, timm's own model pruned with prune_norm=True.
        reference.prune_intermediate_layers((0, 1), prune_norm=not kept)
        their_final, theirs = reference.forward_intermediates(x, indices=(0, 1))
    torch.testing.assert_close(final, their_final, rtol=0, atol=0)
    for ours, their_map in zip(maps, theirs, strict=True):
        torch.testing.assert_close(ours, their_map, rtol=0, atol=0)


# -- test_model_backward -----------------------------------------------------------------


@pytest.mark.parametrize("case", params())
def test_backward(case: Case) -> None:
    """Ports timm's ``test_model_backward`` and ``test_model_backward_features``: in
    train mode, a backward from the outputs reaches every parameter (timm asserts
    ``num_grad == num_params`` for its features_only models), and nothing is NaN.
    A feature model holds only what its levels compute, so this holds on every
    backend (docs/training.md#what-a-feature-model-holds)."""
    model = case.build(out_indices=(0, -1)).train()
    outputs = model(case.input())
    sum(out.float().mean() for out in outputs).backward()
    assert all(not torch.isnan(out).any() for out in outputs)
    num_params = sum(p.numel() for p in model.parameters())
    assert grad_numel(model.parameters()) == num_params > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("case", params())
def test_default_cfgs(case: Case) -> None:
    """Ports timm's ``test_model_default_cfgs`` for what a feature model's
    ``pretrained_cfg`` carries: the input size it was built for, a mean and std per
    input channel, a crop fraction and an interpolation timm's transforms take, the
    same under ``default_cfg`` (docs/training.md#timms-data-tools)."""
    from timm.data import create_transform, resolve_model_data_config

    source = case.source()
    model = case.build(source)
    cfg = model.pretrained_cfg
    assert cfg == model.default_cfg
    # timm keeps the pretrained size in its cfg where a model is built at another
    # (img_size=): its own tools resolve that size, and so do unifeat's.
    own = getattr(source, "pretrained_cfg", None) if case.backend == "timm" else None
    size = tuple(own["input_size"]) if own else tuple(model.input_size)
    assert tuple(cfg["input_size"]) == size
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] in ("bilinear", "bicubic")
    transform = create_transform(**resolve_model_data_config(model))
    from PIL import Image

    pixels = transform(Image.new("RGB", (100, 80)))
    assert tuple(pixels.shape) == tuple(cfg["input_size"])


@pytest.mark.parametrize("case", params())
def test_feature_cls(case: Case) -> None:
    """timm's ``feature_cls=`` (docs/migrating.md#feature_cls): ``'list'`` and
    ``'dict'`` give those layouts of the same maps everywhere; ``'getter'`` is
    timm's and open_clip's own ``forward_intermediates``, refused where a library has
    none; ``'fx'`` reads timm's levels off the FX graph (the same maps), and is
    refused for transformers models, which FX cannot trace."""
    source = case.source().eval()
    x = case.input()
    reference = case.build(source).eval()
    with torch.no_grad():
        expected = reference(x)
        as_dict = case.build(source, feature_cls="dict").eval()(x)
        as_list = case.build(source, feature_cls="list").eval()(x)
    assert list(as_dict) == reference.feature_info.module_name()
    for maps in (list(as_dict.values()), as_list):
        for ours, theirs in zip(maps, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for runner in ("getter", "fx"):
        allowed = case.backend == "timm" or (runner == "fx" and case.traceable)
        if not allowed:
            with pytest.raises(unifeat.UnsupportedOptionError, match=f"feature_cls='{runner}'"):
                case.build(source, feature_cls=runner)
            continue
        with torch.no_grad():
            got = case.build(source, feature_cls=runner).eval()(x)
        for ours, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# -- test_model_forward_fx / test_model_backward_fx -------------------------------------

_TRACEABLE = params(
    where=lambda case: case.traceable,
)


@pytest.mark.parametrize("case", _TRACEABLE)
def test_forward_fx(case: Case) -> None:
    """Ports timm's ``test_model_forward_fx``: a feature model returning the graph's
    last eval node gives exactly the model's own output. (timm builds it with
    torchvision's ``create_feature_extractor``; here the node comes from
    ``unifeat.get_node_names`` and goes to ``return_nodes``.)"""
    source = case.source().eval()
    _, eval_nodes = unifeat.get_node_names(source)
    model = case.build(source, return_nodes=[eval_nodes[-1]]).eval()
    x = case.input(batch=1)
    with torch.no_grad():
        outputs = model(x)
        expected = source(x)
    assert list(outputs) == [eval_nodes[-1]]
    assert torch.equal(outputs[eval_nodes[-1]], expected)
    assert not torch.isnan(expected).any()


@pytest.mark.parametrize("case", _TRACEABLE)
def test_backward_fx(case: Case) -> None:
    """Ports timm's ``test_model_backward_fx``: in train mode, the last train node's
    output backpropagates to every parameter of the model (all of them feed the
    logits), with no NaN."""
    source = case.source().train()
    train_nodes, _ = unifeat.get_node_names(source)
    model = case.build(source, return_nodes=[train_nodes[-1]]).train()
    (logits,) = model(case.input()).values()
    logits.mean().backward()
    assert logits.shape[-1] == source(case.input()).shape[-1]
    assert not torch.isnan(logits).any()
    numel = sum(p.numel() for p in source.parameters())
    assert grad_numel(model.parameters()) == numel


# -- test_model_forward_torchscript_with_features_fx --------------------------------------


@pytest.mark.parametrize(
    "case",
    params(),
)
def test_features_torchscript_is_refused(case: Case) -> None:
    """Ports timm's ``test_model_forward_torchscript_with_features_fx``, which scripts
    a features_only model and runs it. unifeat deliberately refuses TorchScript with
    an ``UnsupportedOptionError`` pointing to ``torch.compile`` / ``torch.export``
    (the decided contract of issue 12; a difference from timm and torchvision)."""
    model = case.build().eval()
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"torch\.(compile|export)"):
        torch.jit.script(model)


# -- feature_info defaults and out_indices (test_model_forward_features' levels) ---------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("timm:resnet50", (0, 1, 2, 3, 4), id="timm-resnet50"),
        pytest.param("tv:resnet50", (0, 1, 2, 3, 4), id="tv-resnet50"),
        pytest.param("timm:convnext_tiny", (0, 1, 2, 3), id="timm-convnext"),
        pytest.param("tv:convnext_tiny", (0, 1, 2, 3), id="tv-convnext"),
        pytest.param(
            "timm:swin_tiny_patch4_window7_224",
            (0, 1, 2, 3),
            id="timm-swin",
        ),
        pytest.param("tv:swin_t", (0, 1, 2, 3), id="tv-swin"),
        pytest.param("timm:vit_base_patch16_224", (9, 10, 11), id="timm-vit"),
        pytest.param("tv:vit_b_16", (9, 10, 11), id="tv-vit"),
        pytest.param("hf:vit", (9, 10, 11), id="hf-vit"),
    ],
)
def test_default_levels(name: str, expected: tuple[int, ...]) -> None:
    """Ports the level count timm's ``test_model_forward_features`` asserts of the
    default features_only model (at least 3 levels) and timm's defaults themselves:
    every level of a hierarchical net, the last 3 blocks of a plain ViT — the same
    in every backend (docs/levels.md#the-index-rule)."""
    info = unifeat.feature_info(name)
    assert info.out_indices == expected
    assert len(info.channels()) >= 3


@pytest.mark.parametrize("case", params())
def test_out_indices_forms(case: Case) -> None:
    """Ports timm's ``features_only(out_indices=...)`` semantics: an int n is the last
    n levels, negatives count from the end, and each output has its level's
    channels. timm keeps ``(3, 1)`` unordered and drops duplicates silently; unifeat
    sorts into depth order and refuses duplicates and out-of-range values
    (docs/backends/timm.md#differences-from-timms-features_only,
    docs/levels.md#the-index-rule)."""
    n = len(case.info())
    assert case.info(out_indices=2).out_indices == (n - 2, n - 1)
    assert case.info(out_indices=(-1, 0)).out_indices == (0, n - 1)
    assert case.info(out_indices=(-n,)).out_indices == (0,)
    for bad in [(n,), (0, -n), (-n - 1,)]:
        with pytest.raises(unifeat.InvalidIndicesError):
            case.build(out_indices=bad)
    model = case.build(out_indices=(n - 1, 0)).eval()
    assert model.feature_info.out_indices == (0, n - 1)
    with torch.no_grad():
        first, last = model(case.input(batch=1))
    all_channels = case.info().channels(list(range(n)))
    assert [first.shape[1], last.shape[1]] == [all_channels[0], all_channels[-1]]


# -- output_stride ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "output_stride"),
    [
        pytest.param(BY_ID["timm-resnet"], 16, id="timm-resnet-16"),
        pytest.param(BY_ID["timm-resnet"], 8, id="timm-resnet-8"),
        pytest.param(BY_ID["tv-mobilenet"], 16, id="tv-mobilenet-16"),
        pytest.param(BY_ID["hf-resnet"], 16, id="hf-resnet-16"),
        pytest.param(BY_ID["fx-stagenet"], 4, id="fx-stagenet-4"),
    ],
)
def test_output_stride(case: Case, output_stride: int) -> None:
    """Ports timm's ``features_only(output_stride=...)``: the reductions stop at the
    output stride, the maps are that large, and ``feature_info`` answers the same
    as the model built with the option."""
    native = case.info().reduction()
    model = case.build(output_stride=output_stride, out_indices=len(native)).eval()
    info = model.feature_info
    assert info.reduction() == [min(r, output_stride) for r in native]
    assert case.info(output_stride=output_stride, out_indices=len(native)) == info
    with torch.no_grad():
        outputs = model(case.input(batch=1))
    _check_maps(outputs, info.channels(), info.reduction(), case.size, 1)
    assert outputs[-1].shape[-1] == case.size // output_stride


@pytest.mark.parametrize("case", params(where=lambda case: case.tokens))
def test_output_stride_of_a_token_model(case: Case) -> None:
    """timm raises ``TypeError`` for ``output_stride`` on a ViT even at its patch
    size; unifeat accepts the patch size as a no-op and refuses other values with
    ``UnsupportedOptionError`` (docs/backends/timm.md#differences-from-timms-features_only,
    docs/output-stride.md)."""
    patch = case.info().reduction()[-1]
    assert case.info(output_stride=patch) == case.info()
    with pytest.raises(unifeat.UnsupportedOptionError, match="output_stride"):
        case.build(output_stride=patch // 2)


# -- tests/test_prune.py -------------------------------------------------------------------


def test_pruned_model_feature_info_matches_forward() -> None:
    """Ports timm's ``test_pruned_feature_info_matches_forward`` (``tests/test_prune.py``):
    a channel-pruned timm model (new widths) reports the channels its maps have."""
    model = unifeat.create_model("timm:efficientnet_b1_pruned", features_only=True).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 96, 96))
    assert [o.shape[1] for o in outputs] == model.feature_info.channels()
