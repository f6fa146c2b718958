"""Every row of docs/errors.md that applies to the timm backend, messages included.

InvalidNodeError and TracingError belong to the FX node-name API (docs/node-names.md),
which the timm backend does not use; they are covered where FX is.
"""

from __future__ import annotations

import builtins

import pytest
import timm
import torch

import unifeat
from unifeat import (
    BackendUnavailableError,
    CheckpointError,
    InvalidIndicesError,
    UnifeatError,
    UnknownBackendError,
    UnknownModelError,
    UnsupportedOptionError,
    _registry,
)


def test_every_error_is_a_unifeat_error_and_a_builtin():
    pairs = {
        UnknownModelError: KeyError,
        UnknownBackendError: KeyError,
        InvalidIndicesError: IndexError,
        UnsupportedOptionError: ValueError,
        unifeat.InvalidNodeError: KeyError,
        unifeat.TracingError: RuntimeError,
        BackendUnavailableError: ImportError,
        CheckpointError: RuntimeError,
    }
    for error, builtin in pairs.items():
        assert issubclass(error, UnifeatError) and issubclass(error, builtin)
    # KeyError-based errors still print as prose, not as a quoted repr.
    assert str(UnknownModelError("no such model")) == "no such model"


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UnknownModelError, match=r"'resnet5O'.*close matches: timm:resnet50\b"):
        unifeat.create_model("resnet5O")
    with pytest.raises(UnknownModelError, match=r"close matches: .*timm:convnext_tiny"):
        unifeat.create_model("timm:convnext_tinyy", features_only=True)
    with pytest.raises(KeyError):  # the builtin a user would catch
        unifeat.feature_info("definitely_not_a_model_xyz")


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(
        UnknownBackendError,
        match=r"unknown backend 'caffe'.*known backends are 'timm', 'torchvision', 'hf', "
        r"'open_clip' or 'fx'",
    ):
        unifeat.create_model("caffe:resnet50")
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'caffe'.*'timm'"):
        unifeat.create_model("resnet50", backend="caffe")
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'other'.*'timm'"):
        unifeat.create_model("timm:resnet50", backend="other")
    with pytest.raises(UnknownBackendError, match=r"names backend 'timm' but backend='tv'"):
        unifeat.create_model("timm:resnet50", backend="tv")


@pytest.mark.parametrize(
    ("out_indices", "message"),
    [
        (
            (0, 5),
            r"value 5 is out of range for 'resnet18' \(backend 'timm'\), which has 5 "
            r"levels: valid indices are 0\.\.4 or -5\.\.-1",
        ),
        ((-6,), r"value -6 is out of range.*0\.\.4 or -5\.\.-1"),
        (6, r"last 6 levels, but 'resnet18' \(backend 'timm'\) has 5: use 1\.\.5"),
        ((1, 1), r"duplicate: 1 is repeated"),
        ((4, -1), r"duplicate: 4 and -1 both name level 4"),
        ((), r"out_indices is empty"),
        ((1, "2"), r"must be integers( for .*)?, got '2'"),
        ((1.0,), r"must be integers( for .*)?, got 1\.0"),
    ],
)
def test_invalid_indices(out_indices, message):
    with pytest.raises(InvalidIndicesError, match=message):
        unifeat.create_model("resnet18", features_only=True, out_indices=out_indices)
    with pytest.raises(InvalidIndicesError, match=message):
        unifeat.feature_info("resnet18", out_indices=out_indices)


def test_unsupported_output_stride_names_supported_values():
    with pytest.raises(
        UnsupportedOptionError,
        match=r"output_stride=8 is not supported by 'vit_tiny_patch16_224' "
        r"\(backend 'timm'\): supported values are 16",
    ):
        unifeat.create_model("vit_tiny_patch16_224", features_only=True, output_stride=8)
    with pytest.raises(
        UnsupportedOptionError,
        match=r"output_stride=4 .*supported values are "
        r"8, 16 or 32",
    ):
        unifeat.feature_info("resnet18", output_stride=4)
    with pytest.raises(UnsupportedOptionError, match=r"supported values are 32"):
        unifeat.create_model("densenet121", output_stride=16)  # also for full models
    with pytest.raises(UnsupportedOptionError, match=r"output_stride=0 .*greater than 0"):
        unifeat.create_model("resnet18", features_only=True, output_stride=0)
    source = timm.create_model("resnet18")
    with pytest.raises(UnsupportedOptionError, match=r"cannot be applied to an already built"):
        unifeat.create_model(source, features_only=True, output_stride=8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(output_type="tuple"), r"invalid output_type='tuple'.*expected 'list' or 'dict'"),
        (dict(output_fmt="NLC"), r"invalid output_fmt='NLC'.*expected 'NCHW' or 'NHWC'"),
        (dict(pretrained="yes"), r"invalid pretrained='yes'"),
        (
            dict(return_prefix_tokens=True),
            r"return_prefix_tokens=True needs a token model.*"
            r"'resnet18'",
        ),
    ],
)
def test_unsupported_options(options, message):
    with pytest.raises(UnsupportedOptionError, match=message):
        unifeat.create_model("resnet18", features_only=True, **options)


def test_feature_options_without_features_only_are_refused():
    with pytest.raises(
        UnsupportedOptionError,
        match=r"out_indices, output_type only apply to "
        r"feature models",
    ):
        unifeat.create_model("resnet18", out_indices=(1,), output_type="dict")


def test_missing_backend_library_names_the_pip_extra(monkeypatch):
    monkeypatch.setattr(_registry, "_ADAPTERS", {})
    real_find_spec = _registry.importlib.util.find_spec
    monkeypatch.setattr(
        _registry.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "timm" else real_find_spec(name, *a),
    )
    with pytest.raises(
        BackendUnavailableError, match=r"needs the 'timm' package.*pip install \"unifeat\[timm\]\""
    ):
        unifeat.create_model("timm:resnet18")
    with pytest.raises(ImportError):
        unifeat.list_models(backend="timm")


def test_broken_backend_install_names_the_pip_extra(monkeypatch):
    monkeypatch.setattr(_registry, "_ADAPTERS", {})
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("simulated broken install")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "unifeat._backends.timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(BackendUnavailableError, match=r"could not import 'timm'.*unifeat\[timm\]"):
        unifeat.create_model("timm:resnet18")


def test_checkpoint_errors_name_the_file_and_the_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        unifeat.create_model("resnet18", checkpoint_path=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(
        CheckpointError,
        match=r"does not fit 'resnet18'.*missing: conv1\.weight"
        r".*wrong shape: fc\.weight \(3, 3\)",
    ):
        unifeat.create_model("resnet18", features_only=True, checkpoint_path=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"could not read checkpoint"):
        unifeat.create_model("resnet18", checkpoint_path=garbage)


def test_failed_call_leaves_the_passed_module_untouched():
    source = timm.create_model("resnet18").train()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    children = list(source.named_children())
    with pytest.raises(InvalidIndicesError):
        unifeat.create_model(source, features_only=True, out_indices=(9,))
    assert source.training
    assert list(source.named_children()) == children
    for key, value in source.state_dict().items():
        assert torch.equal(value, before[key])


def test_no_error_is_a_bare_assert_on_user_input():
    """Options that timm asserts on come back as unifeat errors (python -O safe)."""
    with pytest.raises(UnifeatError):
        unifeat.create_model("vit_tiny_patch16_224", output_stride=8)
    with pytest.raises(UnifeatError):
        unifeat.create_model(123)


@pytest.mark.parametrize("name", ["timm:resnet18", "tv:resnet18", "oc:RN50"])
def test_unreachable_pretrained_weights_are_a_checkpoint_error(name, monkeypatch):
    """A library that cannot fetch its pretrained weights (offline; the hubs are out of
    reach of this machine and of CI) gives one CheckpointError naming the model and
    checkpoint_path=, not its hub client's exception."""
    import urllib.error

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(CheckpointError, match=r"pretrained weights of .*checkpoint_path="):
        unifeat.create_model(name, pretrained=True, features_only=True)
