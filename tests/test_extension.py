"""Third-party backends: ``unifeat.register_backend`` and the ``unifeat.backends``
entry-point group, as a package outside unifeat would use them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import unifeat
from unifeat import _registry
from unifeat.backends import Adapter, BuildPlan


class _Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 2, 1)
        self.stage = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))


class _Zoo(Adapter):
    name = "zoo"

    def has_model(self, name: str) -> bool:
        return name == "net"

    def model_names(self) -> list[str]:
        return ["net"]

    def build(self, plan: BuildPlan, *, meta: bool, extra_kwargs: object = None) -> nn.Module:
        if meta:
            with torch.device("meta"):
                return _Net(**plan.model_kwargs)
        return _Net(**plan.model_kwargs)


def test_a_registered_backend_serves_every_entry_point() -> None:
    unifeat.register_backend("zoo", _Zoo, aliases=("z",))
    assert unifeat.feature_info("zoo:net", width=4).channels() == [4, 8]
    model = unifeat.create_model("z:net", features_only=True, out_indices=(-1,))
    assert model.backend == "zoo" and model(torch.randn(1, 3, 32, 32))[0].shape == (1, 16, 8, 8)
    assert unifeat.list_models(backend="zoo") == ["net"]
    assert "stem" in unifeat.get_node_names("zoo:net")[1]
    assert unifeat.create_model("net", features_only=True).backend == "zoo"  # bare names too


def test_names_are_not_taken_twice_unless_asked() -> None:
    unifeat.register_backend("zoo", _Zoo)
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"registered already.*replace=True"):
        unifeat.register_backend("zoo", _Zoo)
    with pytest.raises(unifeat.UnsupportedOptionError, match="'tv' is taken by backend"):
        unifeat.register_backend("other", _Zoo, aliases=("tv",))
    unifeat.register_backend("zoo", _Zoo, replace=True)
    for bad in ("", "a:b", "a/b"):
        with pytest.raises(unifeat.UnsupportedOptionError, match="invalid backend name"):
            unifeat.register_backend(bad, _Zoo)
    with pytest.raises(unifeat.UnsupportedOptionError, match="invalid adapter"):
        unifeat.register_backend("zoo2", "not.a.path")


def test_a_backend_whose_library_is_missing_names_what_to_install() -> None:
    unifeat.register_backend(
        "ghost", "ghost_pkg.adapter:Adapter", requires="ghost_pkg", extra="ghost-zoo"
    )
    with pytest.raises(unifeat.BackendUnavailableError, match="pip install ghost-zoo"):
        unifeat.create_model("ghost:anything")


def test_an_installed_package_is_found_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distribution on sys.path that declares ``[unifeat.backends]`` is picked up,
    as pip-installed plugins are, without importing it before it is used."""
    package = tmp_path / "tinyzoo"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from unifeat.backends import Adapter

            class TinyZoo(Adapter):
                name = "tinyzoo"
                def has_model(self, name):
                    return name == "pair"
                def model_names(self):
                    return ["pair"]
                def build(self, plan, *, meta, extra_kwargs=None):
                    with torch.device("meta" if meta else "cpu"):
                        return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 8, 3, 2, 1))
            """
        )
    )
    info = tmp_path / "tinyzoo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyzoo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[unifeat.backends]\ntinyzoo = tinyzoo:TinyZoo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_registry, "_entry_points_read", False)
    import sys

    assert "tinyzoo" in _registry.backend_names()
    assert "tinyzoo" not in sys.modules  # registered, not imported
    assert "tinyzoo:pair" in unifeat.list_models("pa*")
    model = unifeat.create_model("tinyzoo:pair", features_only=True)
    assert model.backend == "tinyzoo" and model.feature_info.channels() == [4, 8]
