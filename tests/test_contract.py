"""The contract every adapter keeps, written once (``AdapterContract``) and run
against each backend by a small subclass that supplies a tiny model.

What a backend does differently (how it finds levels, how it truncates) is
tested in its own file; here only what SPEC §2-4, §7 and §8 promise for all.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import unifeat


class AdapterContract:
    """Subclasses set the model and what it is; every test below runs for each."""

    name: ClassVar[Any]
    """A model name, or a zero-argument callable returning a module instance."""
    kwargs: ClassVar[dict[str, Any]] = {}
    size: ClassVar[int] = 64
    backend: ClassVar[str]
    tokens: ClassVar[bool] = False
    """A token model: prefix tokens exist and maps come from [N, L, C] blocks."""

    def model_arg(self) -> Any:
        return self.name() if callable(self.name) else self.name

    def info(self, **options: Any) -> unifeat.FeatureInfo:
        return unifeat.feature_info(self.model_arg(), **self.kwargs, **options)

    def build(self, **options: Any) -> Any:
        options.setdefault("features_only", True)
        return unifeat.create_model(self.model_arg(), **self.kwargs, **options).eval()

    def input(self, batch: int = 2) -> Tensor:
        return torch.randn(batch, 3, self.size, self.size)

    def every(self) -> list[int]:
        return list(range(len(self.info())))

    # -- levels and indices (SPEC §2, §3) -----------------------------------------------

    def test_levels_match_the_maps(self) -> None:
        info = self.info()
        model = self.build(out_indices=self.every())
        with torch.no_grad():
            maps = model(self.input())
        assert len(maps) == len(info) >= 2
        for level, feature_map in zip(info.get_dicts(idx=self.every()), maps, strict=True):
            assert feature_map.shape[0] == 2
            assert feature_map.shape[1] == level["num_chs"]
            assert self.size // feature_map.shape[-1] == level["reduction"]
        assert model.backend == self.backend

    def test_indices_are_normalized_and_in_depth_order(self) -> None:
        n = len(self.info())
        model = self.build(out_indices=(-1, 0))
        assert model.feature_info.out_indices == (0, n - 1)
        last_two = self.build(out_indices=2)
        assert last_two.feature_info.out_indices == (n - 2, n - 1)
        with torch.no_grad():
            maps = model(self.input())
        channels = self.info().channels([0, n - 1])
        assert [m.shape[1] for m in maps] == channels

    @pytest.mark.parametrize(
        "bad,match",
        [((99,), r"valid"), ((0, 0), r"duplicate"), ((), r"empty"), (("a",), r"'a'")],
    )
    def test_bad_indices_name_the_value(self, bad: Any, match: str) -> None:
        with pytest.raises(unifeat.InvalidIndicesError, match=match):
            self.build(out_indices=bad)

    def test_feature_info_round_trips_json(self) -> None:
        info = self.info(out_indices=(0, -1))
        again = unifeat.FeatureInfo.model_validate_json(info.model_dump_json())
        assert again == info and again.channels() == info.channels()

    # -- outputs ------------------------------------------------------------------------

    def test_dict_and_nhwc_outputs(self) -> None:
        listed = self.build(out_indices=(0, -1))
        keyed = self.build(out_indices=(0, -1), output_type="dict", output_fmt="NHWC")
        keyed.load_state_dict(listed.state_dict())
        x = self.input()
        with torch.no_grad():
            maps, by_name = listed(x), keyed(x)
        assert list(by_name) == listed.feature_info.module_name()
        for nchw, nhwc in zip(maps, by_name.values(), strict=True):
            assert torch.equal(nchw.permute(0, 2, 3, 1), nhwc)

    def test_prefix_tokens(self) -> None:
        if not self.tokens:
            with pytest.raises(unifeat.UnsupportedOptionError, match="return_prefix_tokens"):
                self.build(return_prefix_tokens=True)
            return
        model = self.build(out_indices=(-1,), return_prefix_tokens=True)
        with torch.no_grad():
            ((feature_map, prefix),) = model(self.input())
        assert prefix.dim() == 3 and prefix.shape[0] == 2
        assert prefix.shape[-1] == feature_map.shape[1]

    # -- SPEC §4 ------------------------------------------------------------------------

    def test_forward_intermediates_and_prune(self) -> None:
        model = self.build(out_indices=self.every())
        x = self.input()
        with torch.no_grad():
            full = model(x)
            maps = model.forward_intermediates(x, indices=(0, -1), intermediates_only=True)
            assert torch.equal(maps[0], full[0]) and torch.equal(maps[1], full[-1])
            assert model.prune_intermediate_layers((0, 1)) == [0, 1]
            pruned = model(x)
        assert len(pruned) == 2 and torch.equal(pruned[1], full[1])
        with pytest.raises(unifeat.InvalidIndicesError, match="pruned"):
            model.forward_intermediates(x, indices=(-1,))

    # -- SPEC §8 ------------------------------------------------------------------------

    def test_state_dict_deepcopy_and_pickle(self) -> None:
        model = self.build(out_indices=(0, -1))
        source = (
            unifeat.create_model(self.model_arg(), **self.kwargs)
            if not callable(self.name)
            else self.name()
        )
        assert set(model.state_dict()) <= set(source.state_dict())
        model.load_state_dict(source.state_dict())
        x = self.input()
        with torch.no_grad():
            expected = model(x)
            for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
                assert all(torch.equal(a, b) for a, b in zip(clone(x), expected, strict=True))

    def test_train_mode_gradients_and_dtype(self) -> None:
        model = self.build(out_indices=(0, -1)).train()
        assert model.training
        maps = model(self.input())
        sum(m.float().sum() for m in maps).backward()
        assert any(p.grad is not None for p in model.parameters())
        model.eval().to(torch.float64)
        with torch.no_grad():
            maps = model(self.input().double())
        assert all(m.dtype == torch.float64 for m in maps)


class _TwoStageNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean((2, 3)))


_HF_TOKENS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
)
_HF_RESNET = dict(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])


class TestTimmContract(AdapterContract):
    name = "timm:resnet18"
    backend = "timm"


class TestTimmTokenContract(AdapterContract):
    name = "timm:vit_tiny_patch16_224"
    kwargs: ClassVar[dict[str, Any]] = {"img_size": 64, "depth": 4}
    backend = "timm"
    tokens = True


class TestTorchvisionContract(AdapterContract):
    name = "tv:resnet18"
    backend = "torchvision"


class TestFxContract(AdapterContract):
    name = staticmethod(_TwoStageNet)
    backend = "fx"

    def test_a_failed_call_leaves_a_module_untouched(self) -> None:
        module = self.name()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        mode = module.training
        with pytest.raises(unifeat.InvalidIndicesError):
            unifeat.create_model(module, features_only=True, out_indices=(99,))
        unifeat.create_model(module, features_only=True).eval()
        assert module.training == mode
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class TestHfContract(AdapterContract):
    name = "hf:resnet"
    kwargs = _HF_RESNET
    backend = "hf"


class TestHfTokenContract(AdapterContract):
    name = "hf:dinov2"
    # DINOv2's config sizes its MLP by mlp_ratio (it takes no intermediate_size).
    kwargs: ClassVar[dict[str, Any]] = {
        **{k: v for k, v in _HF_TOKENS.items() if k != "intermediate_size"},
        "mlp_ratio": 2,
    }
    backend = "hf"
    tokens = True


_OC_VIT = dict(layers=4, width=64, head_width=32, image_size=64, patch_size=16)


class TestOpenClipTokenContract(AdapterContract):
    name = "oc:ViT-B-32"
    kwargs = _OC_VIT
    backend = "open_clip"
    tokens = True


class TestOpenClipResNetContract(AdapterContract):
    name = "oc:RN50"
    kwargs: ClassVar[dict[str, Any]] = dict(
        layers=(1, 1, 1, 1), width=16, head_width=16, image_size=64
    )
    backend = "open_clip"
