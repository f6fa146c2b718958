"""Category (a): argument types and values of every public function.

``create_model``, ``feature_info``, ``get_node_names``, ``list_models``, the
``FeatureInfo`` methods, ``forward_intermediates`` and
``prune_intermediate_layers``, each given what a user might pass by mistake.
Every row checks the exception class (a ``UnifeatError`` that is also the
builtin a user catches) and the message: it names the bad value, the model and
its backend, and what is valid. Nothing may print a traceback on the way.

Options that ``create_model`` and ``feature_info`` share run through both, on
every backend: they must refuse the same values the same way.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import unifeat
from unifeat import (
    FeatureInfo,
    InvalidIndicesError,
    UnifeatError,
    UnknownBackendError,
    UnknownModelError,
    UnsupportedOptionError,
)

from ._support import (
    BACKENDS,
    HF_TOKENS,
    HF_VIT,
    TIMM,
    TV,
    Backend,
    eval_model,
    maps_of,
    param,
    per_backend,
    refused,
)


@pytest.fixture(autouse=True)
def _no_traceback_on_stderr(capfd: pytest.CaptureFixture[str]) -> Any:
    """A refused call says so in its exception, never by printing a traceback."""
    yield
    assert "Traceback" not in capfd.readouterr().err


# -- options shared by create_model and feature_info, on every backend -------------------

# (row id, options, expected classes, message patterns); the backend's name is
# added to the patterns except where the backend is the bad value.
_VALID_STRIDES = {
    "timm": r"supported values are [^:]*\b16\b",
    "tv": r"supported values are [^:]*\b16\b",
    "hf-resnet": r"supported values are [^:]*\b16\b",
    "hf-vit": r"supported values are 8\b",
    "module": r"supported values are [^:]*\b8\b",
}
OPTION_ROWS: list[tuple[str, dict[str, Any], Any, list[str]]] = [
    (
        "out_indices-out-of-range",
        dict(out_indices=(99,)),
        InvalidIndicesError,
        [r"\b99\b", r"valid indices are 0\.\.\d+ or -\d+\.\.-1"],
    ),
    ("out_indices-zero", dict(out_indices=0), InvalidIndicesError, [r"=0\b", r"at least 1"]),
    ("out_indices-duplicate", dict(out_indices=(0, 0)), InvalidIndicesError, [r"duplicate"]),
    ("out_indices-empty", dict(out_indices=()), InvalidIndicesError, [r"empty"]),
    ("out_indices-str", dict(out_indices=("a",)), InvalidIndicesError, [r"'a'", r"integers"]),
    ("out_indices-bool", dict(out_indices=True), InvalidIndicesError, [r"\bTrue\b"]),
    ("out_indices-float", dict(out_indices=1.5), InvalidIndicesError, [r"1\.5"]),
    (
        "output_stride-zero",
        dict(output_stride=0),
        UnsupportedOptionError,
        [r"output_stride=0\b", r"greater than 0"],
    ),
    ("output_stride-unsupported", dict(output_stride=7), UnsupportedOptionError, [r"=7\b"]),
    ("output_stride-str", dict(output_stride="16"), UnsupportedOptionError, [r"'16'"]),
    ("output_stride-bool", dict(output_stride=True), UnsupportedOptionError, [r"=True\b"]),
    (
        "output_type",
        dict(output_type="tuple"),
        UnsupportedOptionError,
        [r"output_type='tuple'", r"'list' or 'dict'"],
    ),
    (
        "output_fmt",
        dict(output_fmt="NLC"),
        UnsupportedOptionError,
        [r"output_fmt='NLC'", r"'NCHW' or 'NHWC'"],
    ),
    ("pretrained-str", dict(pretrained="yes"), UnsupportedOptionError, [r"pretrained='yes'"]),
    (
        "features_only-str",
        dict(features_only="yes"),
        UnsupportedOptionError,
        [r"features_only='yes'"],
    ),
    (
        "return_prefix_tokens-int",
        dict(return_prefix_tokens=1),
        UnsupportedOptionError,
        [r"return_prefix_tokens=1\b"],
    ),
    (
        "backend-unknown",
        dict(backend="caffe"),
        UnknownBackendError,
        [r"'caffe'", r"known backends are 'timm', 'torchvision', 'hf', 'open_clip' or 'fx'"],
    ),
    (
        "checkpoint_path-int",
        dict(checkpoint_path=123),
        UnsupportedOptionError,
        [r"checkpoint_path=123\b"],
    ),
]


def _option_patterns(backend: Backend, row_id: str, patterns: list[str]) -> list[str]:
    found = list(patterns)
    if row_id == "output_stride-unsupported":
        found.append(_VALID_STRIDES[backend.id])
    if row_id != "backend-unknown":
        found.append(backend.named)
    return found


# Same code path whatever the backend, and a model build each: run on timm only.
_TIMM_ONLY = {"out_indices-duplicate", "output_stride-str", "output_stride-bool"}
_ROWS = [(row[0], row) for row in OPTION_ROWS if row[0] not in _TIMM_ONLY]
_ROWS_TIMM = [(row[0], row) for row in OPTION_ROWS if row[0] in _TIMM_ONLY]


@pytest.mark.parametrize(
    ("backend", "row"),
    per_backend(BACKENDS, _ROWS) + per_backend([TIMM], _ROWS_TIMM),
)
def test_create_model_refuses(backend: Backend, row: Any) -> None:
    row_id, options, expected, patterns = row
    refused(
        lambda: backend.create(**options),
        expected,
        _option_patterns(backend, row_id, patterns),
    )


# feature_info drops these four before any backend sees them: one backend shows it.
_FI_TIMM_ONLY = {"output_fmt", "pretrained-str", "features_only-str", "return_prefix_tokens-int"}
_FI_ROWS = [row for row in _ROWS if row[0] not in _FI_TIMM_ONLY]
_FI_ROWS_TIMM = _ROWS_TIMM + [row for row in _ROWS if row[0] in _FI_TIMM_ONLY]


@pytest.mark.parametrize(
    ("backend", "row"),
    per_backend(BACKENDS, _FI_ROWS) + per_backend([TIMM], _FI_ROWS_TIMM),
)
def test_feature_info_refuses(backend: Backend, row: Any) -> None:
    row_id, options, expected, patterns = row
    refused(
        lambda: backend.info(**options),
        expected,
        _option_patterns(backend, row_id, patterns),
    )


# -- the model argument, get_node_names, list_models --------------------------------------

CALL_ROWS = [
    param(
        lambda: unifeat.create_model(123),
        (UnifeatError, ValueError),
        [r"\b123\b", r"model name or a torch\.nn\.Module"],
        id="create_model-int",
    ),
    param(
        lambda: unifeat.create_model(None),
        (UnifeatError, ValueError),
        [r"\bNone\b"],
        id="create_model-None",
    ),
    param(
        lambda: unifeat.create_model(nn.Conv2d),
        (UnifeatError, ValueError),
        [r"Conv2d", r"instance"],
        id="create_model-class-not-instance",
    ),
    param(
        lambda: unifeat.create_model(""),
        UnknownModelError,
        [r"unknown model ''", r"'timm', 'torchvision', 'hf', 'open_clip' or 'fx'"],
        id="create_model-empty-name",
    ),
    param(
        lambda: unifeat.create_model("timm:"),
        UnknownModelError,
        [r"unknown model ''", r"'timm'"],
        id="create_model-prefix-only",
    ),
    param(
        lambda: unifeat.create_model(":resnet18"),
        UnknownBackendError,
        [r"unknown backend ''", r"known backends"],
        id="create_model-empty-prefix",
    ),
    param(
        lambda: unifeat.create_model("timm:resnet18", backend="tv"),
        UnknownBackendError,
        [r"'timm'", r"backend='tv'"],
        id="create_model-conflicting-backends",
    ),
    param(
        lambda: unifeat.create_model("hf:vit", pretrained=True, **HF_VIT),
        UnsupportedOptionError,
        [r"pretrained=True", r"'vit' \(backend 'hf'\)", r"hub id|local directory"],
        id="create_model-hf-type-pretrained",
    ),
    param(
        lambda: unifeat.create_model("tv:resnet18", return_nodes=["layer4"]),
        UnsupportedOptionError,
        [r"return_nodes", r"features_only=True", r"backend 'torchvision'"],
        id="create_model-feature-option-without-features_only",
    ),
    param(
        lambda: unifeat.feature_info(123),
        (UnifeatError, ValueError),
        [r"\b123\b"],
        id="feature_info-int",
    ),
    param(
        lambda: unifeat.feature_info("hf:vit", pretrained=True, **HF_VIT),
        UnsupportedOptionError,
        [r"pretrained=True", r"backend 'hf'"],
        id="feature_info-hf-type-pretrained",
    ),
    param(
        lambda: unifeat.get_node_names(123),
        (UnifeatError, ValueError),
        [r"\b123\b"],
        id="get_node_names-int",
    ),
    param(
        lambda: unifeat.get_node_names("no_such_model_xyz"),
        UnknownModelError,
        [r"'no_such_model_xyz'"],
        id="get_node_names-unknown-model",
    ),
    param(
        lambda: unifeat.get_node_names("resnet18", backend="caffe"),
        UnknownBackendError,
        [r"'caffe'", r"known backends"],
        id="get_node_names-unknown-backend",
    ),
    param(
        lambda: unifeat.list_models(123),
        UnifeatError,
        [r"\b123\b", r"pattern"],
        id="list_models-int-pattern",
    ),
    param(
        lambda: unifeat.list_models(b"res*"),
        UnifeatError,
        [r"b'res\*'", r"pattern"],
        id="list_models-bytes-pattern",
    ),
    param(
        lambda: unifeat.list_models(backend="caffe"),
        UnknownBackendError,
        [r"'caffe'", r"known backends"],
        id="list_models-unknown-backend",
    ),
    param(
        lambda: unifeat.list_models(backend=3),
        UnknownBackendError,
        [r"\b3\b", r"known backends"],
        id="list_models-int-backend",
    ),
]


@pytest.mark.parametrize(("call", "expected", "patterns"), CALL_ROWS)
def test_call_refuses(call: Any, expected: Any, patterns: list[str]) -> None:
    refused(call, expected, patterns)


# -- a module unifeat cannot probe: a clear error and a quiet stderr ----------------------


class GrayNet(nn.Module):
    """Takes one-channel images: unifeat's three-channel shape probe cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage1(self.stem(x))


class FixedSizeNet(nn.Module):
    """A head sized for 32x32 inputs: the probe at the default 224 fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stem(x).flatten(1))


@pytest.mark.parametrize(
    "call",
    [
        param(
            lambda: unifeat.create_model(FixedSizeNet(), features_only=True),
            id="create_model-fixed-size-module",
        ),
        param(lambda: unifeat.feature_info(FixedSizeNet()), id="feature_info-fixed-size-module"),
        param(
            lambda: unifeat.create_model("tv:resnet18", features_only=True, output_stride=1),
            id="create_model-tv-output_stride-1",
        ),
    ],
)
def test_refused_probe_prints_nothing(call: Any, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnsupportedOptionError):
        call()
    assert capfd.readouterr().err == ""


def test_unprobeable_module_error_names_the_way_out() -> None:
    refused(
        lambda: unifeat.create_model(FixedSizeNet(), features_only=True),
        UnsupportedOptionError,
        [r"FixedSizeNet", r"backend 'fx'", r"input_size=\(H, W\)", r"channels"],
    )
    assert unifeat.feature_info(FixedSizeNet(), input_size=32).channels() == [8]


def test_a_one_channel_module_is_probed_with_one_channel() -> None:
    """A plain module is probed with as many channels as its first conv takes."""
    assert unifeat.create_model(GrayNet(), features_only=True).input_size[0] == 1


def test_a_one_channel_module_builds_with_its_channels_given() -> None:
    """The way out the message names: input_size=(C, H, W)."""
    source = GrayNet().eval()
    model = unifeat.create_model(source, features_only=True, input_size=(1, 32, 32)).eval()
    assert model.feature_info.channels() == [8, 16]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], source(x))


# -- FeatureInfo methods -----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _info() -> FeatureInfo:
    """tv:resnet18's five levels with (1, 2) selected (frozen: safe to share)."""
    return TV.info(out_indices=(1, 2))


_LEVELS = [dict(num_chs=c, reduction=r, module=m) for c, r, m in [(8, 2, "a"), (16, 4, "b")]]
_LEVELS.append(dict(num_chs=32, reduction=8, module="c"))
INFO_ROWS = [
    param(
        lambda info: info.from_other(0),
        InvalidIndicesError,
        [r"\b0\b", r"at least 1"],
        id="from_other-zero",
    ),
    param(
        lambda info: info.from_other(-1),
        InvalidIndicesError,
        [r"-1\b", r"at least 1"],
        id="from_other-negative-int",
    ),
    param(
        lambda info: info.from_other((9,)),
        InvalidIndicesError,
        [r"\b9\b", r"0\.\.4 or -5\.\.-1"],
        id="from_other-out-of-range",
    ),
    param(
        lambda info: info.from_other(("a",)),
        InvalidIndicesError,
        [r"'a'"],
        id="from_other-str",
    ),
    param(
        lambda info: info.from_other((0, 0)),
        InvalidIndicesError,
        [r"duplicate"],
        id="from_other-duplicate",
    ),
    param(lambda info: info.from_other(()), InvalidIndicesError, [r"empty"], id="from_other-empty"),
    param(
        lambda info: info.channels(99),
        InvalidIndicesError,
        [r"\b99\b", r"0\.\.4"],
        id="channels-out-of-range",
    ),
    param(
        lambda info: info.channels([0, 99]),
        InvalidIndicesError,
        [r"\b99\b", r"0\.\.4"],
        id="channels-list-out-of-range",
    ),
    param(
        lambda info: info.channels("x"),
        InvalidIndicesError,
        [r"'x'"],
        id="channels-str",
    ),
    param(
        lambda info: info.channels(True),
        InvalidIndicesError,
        [r"\bTrue\b"],
        id="channels-bool",
    ),
    param(
        lambda info: info.reduction(-99),
        InvalidIndicesError,
        [r"-99\b", r"-5\.\.-1"],
        id="reduction-out-of-range",
    ),
    param(
        lambda info: info.module_name(1.5),
        InvalidIndicesError,
        [r"1\.5"],
        id="module_name-float",
    ),
    param(
        lambda info: info[99],
        InvalidIndicesError,
        [r"\b99\b", r"0\.\.4"],
        id="getitem-out-of-range",
    ),
    param(
        lambda info: info.get("nokey"),
        (UnifeatError, KeyError),
        [r"'nokey'", r"num_chs"],
        id="get-unknown-field",
    ),
    param(
        lambda info: info.get_dicts(keys=["nokey"]),
        (UnifeatError, KeyError),
        [r"'nokey'", r"num_chs"],
        id="get_dicts-unknown-field",
    ),
    param(
        lambda info: FeatureInfo.from_dicts(_LEVELS, out_indices=(7,)),
        InvalidIndicesError,
        [r"\b7\b", r"0\.\.2 or -3\.\.-1"],
        id="from_dicts-out-of-range",
    ),
    param(
        lambda info: FeatureInfo.from_dicts(_LEVELS, out_indices=0),
        InvalidIndicesError,
        [r"\b0\b", r"at least 1"],
        id="from_dicts-int-zero",
    ),
    param(
        lambda info: FeatureInfo.from_dicts([]),
        (UnifeatError, ValueError),
        [r"at least one level"],
        id="from_dicts-no-levels",
    ),
    param(
        lambda info: FeatureInfo.from_dicts([dict(num_chs=1)]),
        (UnifeatError, ValueError),
        [r"reduction", r"module"],
        id="from_dicts-missing-fields",
    ),
]


@pytest.mark.parametrize(("call", "expected", "patterns"), INFO_ROWS)
def test_feature_info_methods_refuse(call: Any, expected: Any, patterns: list[str]) -> None:
    info = _info()
    refused(lambda: call(info), expected, patterns)


def test_from_other_takes_an_int_as_the_last_n_levels() -> None:
    assert _info().from_other(2).out_indices == (3, 4)


def test_get_dicts_with_one_key_as_a_string() -> None:
    info = _info()
    try:
        found = info.get_dicts(keys="num_chs")
    except UnifeatError as error:
        assert "'num_chs'" in str(error)
    else:
        assert found == [{"num_chs": 64}, {"num_chs": 128}]


# -- forward_intermediates and prune_intermediate_layers, on every backend -----------------

_X = torch.randn(1, 3, 32, 32)
FORWARD_ROWS = [
    ("indices-out-of-range", (dict(indices=99), InvalidIndicesError, [r"\b99\b", r"1\.\.\d"])),
    ("indices-duplicate", (dict(indices=(0, 0)), InvalidIndicesError, [r"duplicate"])),
    ("indices-str", (dict(indices=("a",)), InvalidIndicesError, [r"'a'"])),
    (
        "output_fmt",
        (dict(output_fmt="NLC"), UnsupportedOptionError, [r"'NLC'", r"'NCHW' or 'NHWC'"]),
    ),
    (
        "intermediates_only-str",
        (dict(intermediates_only="yes"), UnsupportedOptionError, [r"intermediates_only='yes'"]),
    ),
    ("norm", (dict(norm=True), UnsupportedOptionError, [r"norm=True"])),
]
# norm=True applies the model's final norm to the levels (docs/levels.md): valid where
# the model has one whose width fits them (timm's models, a transformers ViT).
_NORM_BACKENDS = [b for b in BACKENDS if b.id not in ("timm", "hf-vit")]


@pytest.mark.parametrize(
    ("backend", "row"),
    per_backend(BACKENDS, [r for r in FORWARD_ROWS if r[0] != "norm"])
    + per_backend(_NORM_BACKENDS, [r for r in FORWARD_ROWS if r[0] == "norm"]),
)
def test_forward_intermediates_refuses(backend: Backend, row: Any) -> None:
    options, expected, patterns = row
    model = eval_model(backend)
    with torch.no_grad():
        refused(
            lambda: model.forward_intermediates(_X, **options),
            expected,
            [*patterns, backend.named],
        )


PRUNE_ROWS = [
    ("indices-out-of-range", (99, InvalidIndicesError, [r"\b99\b", r"1\.\.\d"])),
    ("indices-str", (("a",), InvalidIndicesError, [r"'a'"])),
    ("indices-empty", ((), InvalidIndicesError, [r"empty"])),
]


@pytest.mark.parametrize(("backend", "row"), per_backend(BACKENDS, PRUNE_ROWS))
def test_prune_refuses_and_leaves_the_model_as_it_was(backend: Backend, row: Any) -> None:
    indices, expected, patterns = row
    model, info, before = _prune_subject(backend)
    refused(lambda: model.prune_intermediate_layers(indices), expected, [*patterns, backend.named])
    assert model.feature_info == info
    with torch.no_grad():
        after = maps_of(model(_X))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@functools.cache
def _prune_subject(backend: Backend) -> tuple[Any, FeatureInfo, list[torch.Tensor]]:
    """One model per backend for the refused prunes, with what it gave before them."""
    model = backend.create(out_indices=(0, -1)).eval()
    with torch.no_grad():
        return model, model.feature_info, maps_of(model(_X))


def test_hf_return_prefix_tokens_needs_a_token_model() -> None:
    """A control row: the hf CNN refuses prefix tokens, the hf ViT gives them."""
    refused(
        lambda: unifeat.create_model(
            "hf:resnet",
            features_only=True,
            return_prefix_tokens=True,
            embedding_size=8,
            hidden_sizes=[16, 32, 48, 64],
            depths=[1, 1, 1, 1],
        ),
        UnsupportedOptionError,
        [r"return_prefix_tokens=True", r"'resnet' \(backend 'hf'\)", r"token model"],
    )
    model = HF_TOKENS.create(return_prefix_tokens=True).eval()
    with torch.no_grad():
        ((feature_map, prefix),) = model(_X)[:1]
    assert prefix.shape == (1, 1, 32) and feature_map.shape == (1, 32, 4, 4)


# -- 0-d arrays and tensors as indices: the int they hold, at every entry point ----------

ZERO_D = [np.array(2), torch.tensor(2)]
ZERO_D_BAD = [np.array(2.0), np.array(True), torch.tensor(2.0), torch.tensor(True)]


@pytest.mark.parametrize("value", ZERO_D, ids=repr)
def test_zero_d_integer_indices_are_that_int_everywhere(value: Any) -> None:
    assert TV.info(out_indices=value) == TV.info(out_indices=2)
    assert TV.create(out_indices=value).feature_info.out_indices == (3, 4)
    info = _info()
    assert info.from_other(value) == info.from_other(2)
    assert FeatureInfo.from_dicts(_LEVELS, out_indices=value).out_indices == (1, 2)
    assert info.channels(value) == info.channels(2) == 128
    assert info.channels([value, np.array(-1)]) == [128, 512]
    assert info[value] == info[2]
    model = TV.create(out_indices=(0, -1)).eval()
    with torch.no_grad():
        _, maps = model.forward_intermediates(_X, indices=value)
        _, expected = model.forward_intermediates(_X, indices=2)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))
    assert list(model.prune_intermediate_layers(value)) == [3, 4]


@pytest.mark.parametrize("value", ZERO_D_BAD, ids=repr)
def test_zero_d_float_and_bool_indices_are_refused_everywhere(value: Any) -> None:
    shown = re.escape(repr(value))
    refused(lambda: TV.info(out_indices=value), InvalidIndicesError, [shown, TV.named])
    refused(lambda: TV.create(out_indices=value), InvalidIndicesError, [shown, TV.named])
    info = _info()
    refused(lambda: info.from_other(value), InvalidIndicesError, [shown])
    refused(lambda: info.channels(value), InvalidIndicesError, [shown, r"0\.\.4"])
    refused(lambda: info.channels([0, value]), InvalidIndicesError, [shown])
    refused(lambda: info[value], InvalidIndicesError, [shown])
    model = eval_model(TV)
    with torch.no_grad():
        refused(
            lambda: model.forward_intermediates(_X, indices=value), InvalidIndicesError, [shown]
        )
    refused(lambda: model.prune_intermediate_layers(value), InvalidIndicesError, [shown])


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_a_torchscript_module_is_refused_naming_the_way_out(compile_: str) -> None:
    """A scripted or traced module is a compiled program (torch's own get_submodule
    raised "not supported on ScriptModules"): every entry point refuses it, naming
    the eager module and the model's name as what it takes."""
    import torchvision

    eager = torchvision.models.resnet18().eval()
    compiled = (
        torch.jit.script(eager)
        if compile_ == "script"
        else torch.jit.trace(eager, torch.randn(1, 3, 64, 64))
    )
    for call in (unifeat.create_model, unifeat.feature_info, unifeat.get_node_names):
        with pytest.raises(unifeat.UnsupportedOptionError, match=r"TorchScript module.*eager"):
            call(compiled)
