"""Property tests: ``feature_info`` and ``create_model`` agree, always.

For random combinations of options, ``feature_info(model, **options)`` and
``create_model(model, features_only=True, **options).feature_info`` either
both succeed with the same ``FeatureInfo``, or both raise the same unifeat
error class. The first property draws every option, bad values included; the
second only well-typed level and stride requests, where the two paths differ
most inside the backends. Examples are derandomized, so a run is repeatable.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import unifeat
from unifeat import UnifeatError

from ._support import BACKENDS, Backend, param

_FEW = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_MANY = settings(_FEW, max_examples=120)

_INDICES = st.one_of(
    st.none(),
    st.integers(-1, 6),
    st.lists(st.integers(-7, 7), min_size=0, max_size=4).map(tuple),
    st.sampled_from(["a", 1.5, True, (1, "2")]),
)
_STRIDES = st.sampled_from([None, 4, 8, 16, 32, 0, 7, "16", True])
ANY_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "out_indices": _INDICES,
        "output_stride": _STRIDES,
        "output_type": st.sampled_from([None, "list", "dict", "tuple"]),
        "output_fmt": st.sampled_from(["NCHW", "NHWC", "nchw"]),
        "return_prefix_tokens": st.sampled_from([False, True, 1]),
        "pretrained": st.sampled_from([False, "yes"]),
        "checkpoint_path": st.sampled_from([None, 123]),
    },
)
LEVEL_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "out_indices": st.one_of(
            st.none(),
            st.integers(1, 6),
            st.lists(st.integers(-7, 7), min_size=1, max_size=4).map(tuple),
        ),
        "output_stride": st.sampled_from([None, 4, 8, 16, 32]),
    },
)


def outcome(call: Any) -> tuple[str, Any]:
    """``("ok", FeatureInfo)`` or ``("error", class)``; a non-unifeat error fails."""
    try:
        return "ok", call()
    except UnifeatError as error:
        return "error", type(error)
    except Exception as error:
        pytest.fail(f"not a unifeat error: {type(error).__name__}: {error}")


def check_agreement(backend: Backend, options: dict[str, Any]) -> None:
    described = outcome(lambda: backend.info(**options))
    built = outcome(lambda: backend.create(**options).feature_info)
    assert described == built, f"options {options}: feature_info {described}, create_model {built}"


@pytest.mark.parametrize("backend", [param(b, id=b.id) for b in BACKENDS])
@_FEW
@given(options=ANY_OPTIONS)
@example(options={"output_type": "tuple"})
def test_agree_on_any_options(backend: Backend, options: dict[str, Any]) -> None:
    check_agreement(backend, options)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.id)
@_FEW
@given(options=LEVEL_OPTIONS)
def test_agree_on_levels_and_strides(backend: Backend, options: dict[str, Any]) -> None:
    check_agreement(backend, options)


# Over 30 s each on two cores for timm's and torchvision's: those run with -m slow.
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.id in ("timm", "tv") else [])
        for b in BACKENDS
    ],
)
@_MANY
@given(options=LEVEL_OPTIONS)
def test_agree_on_levels_and_strides_many(backend: Backend, options: dict[str, Any]) -> None:
    check_agreement(backend, options)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param(
            "timm:mobilenetv3_small_100",
            dict(output_stride=16),
            id="timm-mobilenetv3-output_stride-16",
        ),
        pytest.param("timm:resnet18", dict(output_stride=8), id="timm-resnet18-output_stride-8"),
        pytest.param("tv:resnet50", dict(output_stride=16), id="tv-resnet50-output_stride-16"),
    ],
)
def test_agree_where_strides_are_special(name: str, options: dict[str, Any]) -> None:
    described = outcome(lambda: unifeat.feature_info(name, **options))
    built = outcome(lambda: unifeat.create_model(name, features_only=True, **options).feature_info)
    assert described == built
