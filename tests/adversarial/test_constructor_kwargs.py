"""Category (b): what ``**model_kwargs`` and ``return_nodes`` may carry.

Unknown constructor kwargs of timm and torchvision models are refused before
anything is built, with close matches; transformers config kwargs are checked
against the config class's fields (a typo is an error, not a default); kwargs
given with a module instance, which has no constructor to take them, are
refused rather than dropped; ``return_nodes`` of the wrong type is a unifeat
error. Each row runs through every public entry that takes kwargs:
``create_model`` with and without ``features_only``, ``feature_info`` and
``get_node_names``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import unifeat
from unifeat import InvalidNodeError, TracingError, UnifeatError, UnsupportedOptionError

from ._support import (
    BACKENDS,
    HF_RESNET,
    HF_TOKENS,
    HF_VIT,
    MODULE,
    TIMM,
    TV,
    Backend,
    TinyNet,
    param,
    refused,
)


@pytest.fixture(autouse=True)
def _no_traceback_on_stderr(capfd: pytest.CaptureFixture[str]) -> Any:
    yield
    assert "Traceback" not in capfd.readouterr().err


Entry = Callable[..., Any]
ENTRIES: dict[str, Entry] = {
    "create-features": lambda model, **kw: unifeat.create_model(model, features_only=True, **kw),
    "create-full": lambda model, **kw: unifeat.create_model(model, **kw),
    "feature_info": unifeat.feature_info,
    "get_node_names": unifeat.get_node_names,
}


def _rows(
    name: str,
    rows: list[tuple[str, dict[str, Any], Any, list[str], str | None]],
    skip: frozenset[str] = frozenset(),
) -> list[Any]:
    return [
        param(
            name,
            kwargs,
            expected,
            patterns,
            entry,
            id=f"{name}-{entry}-{row_id}",
            bug_reason=reason,
        )
        for row_id, kwargs, expected, patterns, reason in rows
        for entry in ENTRIES
        if entry not in skip
    ]


NAME_ROWS = [
    *_rows(
        "timm:resnet18",
        [
            (
                "unknown-kwarg",
                dict(num_clases=3),
                UnsupportedOptionError,
                [r"'num_clases'", r"'resnet18' \(backend 'timm'\)", r"num_classes"],
                None,
            ),
            (
                "bad-kwarg-value",
                dict(num_classes="a"),
                UnsupportedOptionError,
                [r"num_classes", r"'a'", r"backend 'timm'"],
                None,
            ),
        ],
    ),
    *_rows(
        "tv:resnet18",
        [
            (
                "unknown-kwarg",
                dict(num_clases=3),
                UnsupportedOptionError,
                [r"'num_clases'", r"'resnet18' \(backend 'torchvision'\)", r"num_classes"],
                None,
            ),
            (
                "bad-kwarg-value",
                dict(num_classes=-1),
                UnsupportedOptionError,
                [r"num_classes", r"-1", r"backend 'torchvision'"],
                None,
            ),
        ],
    ),
    *_rows(
        "hf:vit",
        [
            (
                "config-typo",
                {
                    **{k: v for k, v in HF_VIT.items() if k != "num_hidden_layers"},
                    "num_hiden_layers": 2,
                },
                UnsupportedOptionError,
                [r"'num_hiden_layers'", r"'vit' \(backend 'hf'\)", r"num_hidden_layers"],
                None,
            ),
            (
                "config-bad-type",
                {**HF_VIT, "hidden_size": "a"},
                UnsupportedOptionError,
                [r"hidden_size", r"'a'", r"backend 'hf'"],
                None,
            ),
            (
                "config-bad-value",
                {**HF_VIT, "hidden_size": -1},
                UnsupportedOptionError,
                [r"hidden_size", r"-1", r"backend 'hf'"],
                None,
            ),
            (
                "config-not-a-config",
                {**HF_VIT, "config": 3},
                UnsupportedOptionError,
                [r"config=", r"PretrainedConfig", r"backend 'hf'"],
                None,
            ),
        ],
    ),
    *_rows(
        "hf:resnet",
        [
            (
                "config-typo",
                {**HF_RESNET, "hiden_act": "relu"},
                UnsupportedOptionError,
                [r"'hiden_act'", r"'resnet' \(backend 'hf'\)", r"hidden_act"],
                None,
            ),
        ],
    ),
]


# Only the full model: the feature paths would download the weights (meta builds
# pass weights= through to torchvision), which no test may do.
NAME_ROWS.append(
    param(
        "tv:resnet18",
        dict(weights="DEFAULT"),
        UnsupportedOptionError,
        [r"weights", r"pretrained=True", r"backend 'torchvision'"],
        "create-full",
        id="tv:resnet18-create-full-weights-kwarg",
    )
)


@pytest.mark.parametrize(("name", "kwargs", "expected", "patterns", "entry"), NAME_ROWS)
def test_name_kwargs_refused(
    name: str, kwargs: dict[str, Any], expected: Any, patterns: list[str], entry: str
) -> None:
    refused(lambda: ENTRIES[entry](name, **kwargs), expected, patterns)


@pytest.mark.parametrize(
    ("backend", "kwargs"),
    [
        pytest.param(TIMM, dict(num_classes=3, drop_rate=0.1), id="timm"),
        pytest.param(TV, dict(num_classes=3), id="tv"),
        pytest.param(HF_TOKENS, dict(hidden_act="gelu"), id="hf-vit"),
        pytest.param(MODULE, dict(input_size=(48, 64)), id="module-input_size"),
    ],
)
def test_valid_kwargs_still_accepted(backend: Backend, kwargs: dict[str, Any]) -> None:
    """Controls: a fix that refuses unknown kwargs must keep accepting these."""
    model = backend.arg()
    extra = backend.kwargs if isinstance(model, str) else {}
    info = unifeat.feature_info(model, **extra, **kwargs)
    built = unifeat.create_model(backend.arg(), features_only=True, **extra, **kwargs)
    assert built.feature_info == info


# -- kwargs given with a module instance ----------------------------------------------------

MODULE_KWARG_ROWS = [
    param(
        backend,
        dict(bogus=1),
        entry,
        id=f"{backend.id}-{entry}-unknown-kwarg",
    )
    for backend in BACKENDS
    for entry in ENTRIES
] + [
    param(
        backend,
        dict(train_return_nodes=["layer1"], eval_return_nodes=["layer1"]),
        entry,
        id=f"{backend.id}-{entry}-train_return_nodes",
    )
    for backend in (TV, MODULE)
    for entry in ENTRIES
]


@pytest.mark.parametrize(("backend", "kwargs", "entry"), MODULE_KWARG_ROWS)
def test_module_instance_kwargs_refused(
    backend: Backend, kwargs: dict[str, Any], entry: str
) -> None:
    name = next(iter(kwargs))
    refused(
        lambda: ENTRIES[entry](backend.source(), **kwargs),
        UnsupportedOptionError,
        [rf"'?{name}'?", backend.named],
    )


@pytest.mark.parametrize(
    ("size", "pattern"),
    [
        param(-5, r"input_size=-5\b", id="negative"),
        param("a", r"input_size='a'", id="str"),
        param((0, 32), r"input_size=\(0, 32\)", id="zero"),
    ],
)
def test_module_input_size_refused(size: Any, pattern: str) -> None:
    refused(
        lambda: unifeat.feature_info(TinyNet(), input_size=size),
        UnsupportedOptionError,
        [pattern, r"module TinyNet \(backend 'fx'\)"],
    )


class _Gate(nn.Module):
    """Data-dependent control flow: FX cannot trace through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class GatedNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.gate(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_untraceable_module_names_the_way_out() -> None:
    refused(
        lambda: unifeat.create_model(GatedNet(), features_only=True),
        TracingError,
        [r"module GatedNet \(backend 'fx'\)", r"control flow", r"leaf_modules"],
    )


def test_the_suggested_tracer_kwargs_work() -> None:
    model = unifeat.create_model(
        GatedNet(), features_only=True, tracer_kwargs={"leaf_modules": [_Gate]}
    )
    assert model.feature_info.channels() == [8, 16, 32]


# -- return_nodes ----------------------------------------------------------------------

# Every backend: FX node names where the model traces, module paths where it does not.
_NODE_BACKENDS = (TIMM, TV, HF_TOKENS, MODULE)
RETURN_NODE_ROWS = [
    ("int", 3, (UnifeatError, ValueError), [r"return_nodes=3\b", r"list|dict"]),
    ("int-entry", [1], (UnifeatError, ValueError), [r"return_nodes", r"\b1\b"]),
    ("unknown-node", ["nope"], InvalidNodeError, [r"'nope'", r"get_node_names"]),
]


def _return_node_params() -> list[Any]:
    return [
        param(backend, nodes, expected, patterns, entry, id=f"{backend.id}-{entry}-{row_id}")
        for backend in _NODE_BACKENDS
        for row_id, nodes, expected, patterns in RETURN_NODE_ROWS
        for entry in ("create-features", "feature_info")
    ]


@pytest.mark.parametrize(
    ("backend", "nodes", "expected", "patterns", "entry"), _return_node_params()
)
def test_return_nodes_refused(
    backend: Backend, nodes: Any, expected: Any, patterns: list[str], entry: str
) -> None:
    model = backend.arg()
    extra = backend.kwargs if isinstance(model, str) else {}
    refused(
        lambda: ENTRIES[entry](model, return_nodes=nodes, **extra),
        expected,
        [*patterns, backend.named],
    )


@pytest.mark.parametrize(
    ("backend", "nodes"),
    [
        param(TIMM, ["layer2", "layer4"], id="timm"),
        param(TV, ["layer2", "layer4"], id="tv"),
        param(MODULE, ["stage1", "stage2"], id="module"),
        # transformers models do not trace: their return_nodes are module paths.
        param(HF_TOKENS, ["layers.1", "layers.3"], id="hf-vit"),
    ],
)
def test_feature_info_takes_return_nodes_as_create_model_does(
    backend: Backend, nodes: list[str]
) -> None:
    built = backend.create(return_nodes=nodes)
    assert backend.info(return_nodes=nodes) == built.feature_info
