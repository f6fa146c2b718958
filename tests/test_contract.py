"""The contract every adapter keeps, written once (``AdapterContract``) and run
against each backend by a small subclass that supplies a tiny model.

What a backend does differently (how it finds levels, how it truncates) is
tested in its own file; here only what docs/levels.md, feature-info.md, api.md
and errors.md promise for all.
"""

from __future__ import annotations

import copy
import pickle
import re
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

    # -- levels and indices (docs/levels.md, docs/feature-info.md) -----------------------

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

    # -- docs/api.md -------------------------------------------------------------

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

    # -- docs/api.md -------------------------------------------------------------

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

    # -- one policy and one meaning in every backend ---------------------------------------

    def test_default_indices_follow_the_one_policy(self) -> None:
        """Every level of a hierarchical net, the last 3 blocks of a plain token model."""
        info = self.info()
        n = len(info)
        plain = len(set(info.reduction(list(range(n))))) == 1 and n > 3
        assert info.out_indices == (tuple(range(n - 3, n)) if plain else tuple(range(n)))

    def test_final_output_of_forward_intermediates(self) -> None:
        """The unpooled output of the deepest computed block, in the model's layout:
        tokens for token models (prefix tokens included), a map of the last level's
        grid otherwise; once pruned, the deepest kept level's."""
        model = self.build(out_indices=self.every())
        x = self.input()
        with torch.no_grad():
            final, maps = model.forward_intermediates(x)
            assert isinstance(final, Tensor) and final.shape[0] == 2
            if self.tokens:
                grid = maps[-1].shape[-2] * maps[-1].shape[-1]
                assert final.dim() == 3 and final.shape[1] >= grid
                assert final.shape[2] == maps[-1].shape[1]
            else:
                assert final.dim() == 4 and maps[-1].shape[-2:] in (
                    final.shape[-2:],
                    final.shape[1:3],
                )
            model.prune_intermediate_layers((0, 1))
            final, maps = model.forward_intermediates(x, indices=(1,))
        if self.tokens:
            assert final.dim() == 3 and final.shape[2] == maps[-1].shape[1]
        else:
            nchw = final if final.shape[1] == maps[-1].shape[1] else final.permute(0, 3, 1, 2)
            torch.testing.assert_close(nchw, maps[-1], rtol=0, atol=0)

    def _options(self, tmp_path: Any) -> list[dict[str, Any]]:
        """One plan per create_model option (values this model takes)."""
        info = self.info()
        source = self.model_arg() if callable(self.name) else None
        checkpoint = tmp_path / "weights.pth"
        whole = source if source is not None else unifeat.create_model(self.name, **self.kwargs)
        torch.save(whole.state_dict(), checkpoint)
        options: list[dict[str, Any]] = [
            {},
            {"out_indices": (0, -1)},
            {"out_indices": 2},
            {"output_type": "dict", "output_fmt": "NHWC"},
            {"pretrained": False, "features_only": True},
            {"output_stride": max(info.reduction(self.every()))},
            {"input_size": (self.size, self.size)},
            {"checkpoint_path": checkpoint},
            {"return_prefix_tokens": self.tokens},
        ]
        names = unifeat.get_node_names(self.model_arg(), **self.kwargs)[1]
        picks = [names[len(names) // 3], names[2 * len(names) // 3]]
        options.append({"return_nodes": picks})
        return options

    def test_feature_info_takes_every_create_model_option(self, tmp_path: Any) -> None:
        """feature_info and create_model read the same options through the same plan,
        and describe the same model."""
        for options in self._options(tmp_path):
            described = self.info(**options)
            built = self.build(**{"features_only": True, **options}).feature_info
            assert described == built, options

    def test_return_nodes_take_the_names_get_node_names_gives(self) -> None:
        """FX node names where the model traces, module paths where it does not:
        either way a {name: key} dict returns those nodes, keyed, in depth order."""
        names = unifeat.get_node_names(self.model_arg(), **self.kwargs)[1]
        first, second = names[len(names) // 3], names[2 * len(names) // 3]
        model = self.build(return_nodes={second: "later", first: "earlier"})
        with torch.no_grad():
            out = model(self.input())
        assert list(out) == ["earlier", "later"]
        assert model.feature_info.module_name() == ["earlier", "later"]
        assert [level.node for level in model.feature_info] == [first, second]

    # -- classifier models (docs/training.md) -------------------------------------------

    def test_classifier_interface_where_the_head_is_known(self) -> None:
        """features_only=False: timm's interface (forward_features = the final output of
        a feature model that keeps the final norm, forward_head, reset_classifier)
        where the head is known; elsewhere num_classes= is refused, not ignored."""
        try:
            whole = unifeat.create_model(self.model_arg(), num_classes=0, **self.kwargs)
        except unifeat.UnsupportedOptionError as refusal:
            # the one refusal left: the reason is named (docs/training.md)
            unknown_heads = {"oc:RN50": "ModifiedResNet tower"}
            assert self.name in unknown_heads
            assert unknown_heads[self.name] in str(refusal)
            return
        assert whole.num_classes == 0
        whole.eval()
        try:
            features = self.build(out_indices=(-1,), norm=True)
        except unifeat.UnsupportedOptionError as refusal:
            assert "no final norm" in str(refusal) and not self.tokens
            features = self.build(out_indices=(-1,))
        features.load_state_dict(whole.state_dict())
        x = self.input()
        with torch.no_grad():
            final, _ = features.forward_intermediates(x)
            unpooled = whole.forward_features(x)
            torch.testing.assert_close(unpooled, final, rtol=0, atol=0)
            pooled = whole.forward_head(unpooled, pre_logits=True)
            assert pooled.shape == (2, whole.head_hidden_size)
            whole.reset_classifier(0)
            torch.testing.assert_close(whole(x), pooled, rtol=0, atol=0)
            whole.reset_classifier(3)
            assert whole(x).shape == (2, 3) and whole.num_classes == 3

    # -- the anchors' own tools (docs/training.md) -------------------------------------

    def _whole(self) -> Any:
        """The classifier model where the head is known, else None."""
        try:
            return unifeat.create_model(self.model_arg(), num_classes=3, **self.kwargs)
        except unifeat.UnsupportedOptionError:
            return None

    def test_names_are_the_state_dict_keys(self) -> None:
        """One name scheme: parameter, persistent buffer and module names are the
        state_dict keys (the source's), for the feature and the classifier model."""
        for model in (self.build(out_indices=(0, -1)), self._whole()):
            if model is None:
                continue
            keys = set(model.state_dict())
            parameters = {name for name, _ in model.named_parameters()}
            persistent = {
                f"{path}.{name}" if path else name
                for path, module in model.named_modules()
                for name, _ in module.named_buffers(recurse=False)
                if name not in module._non_persistent_buffers_set
            }
            assert parameters | persistent == keys
            for path, module in model.named_modules():
                held = [n for n, _ in module.named_parameters()] + [
                    n for n, _ in module.named_buffers()
                ]
                if path and held:
                    assert any(key.startswith(f"{path}.") for key in keys), path

    def test_every_parameter_gets_a_gradient(self) -> None:
        """A feature model holds only what its levels compute: sum(level.mean())
        reaches every parameter that requires grad (timm's test_model_backward_features),
        so DDP needs no ignore list."""
        model = self.build(out_indices=(0, -1)).train()
        sum(m.float().mean() for m in _tensors(model(self.input()))).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing
        assert model._ddp_params_and_buffers_to_ignore == []

    def test_timms_data_config_is_unifeats(self) -> None:
        """timm.data.resolve_model_data_config reads the model's pretrained_cfg, which
        says what unifeat.data_config says, field by field."""
        from timm.data import create_transform, resolve_model_data_config

        for model in (self.build(), self._whole()):
            if model is None:
                continue
            theirs = resolve_model_data_config(model)
            ours = unifeat.data_config(model)
            for field in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
                assert theirs[field] == getattr(ours, field), field
            assert model.default_cfg == model.pretrained_cfg
            assert create_transform(**theirs) is not None
        whole = self._whole()
        if isinstance(whole, unifeat.ClassifierModel):  # timm's own model says timm's
            assert whole.pretrained_cfg["num_classes"] == 3
            assert whole.get_submodule(whole.pretrained_cfg["classifier"]) is whole.get_classifier()

    def test_layer_decay_groups_from_the_stem_up(self) -> None:
        """timm's create_optimizer_v2(model, layer_decay=0.75) reads group_matcher():
        per-depth groups, every trainable parameter in one, the stem's lr_scale lowest."""
        from timm.optim import create_optimizer_v2

        model = self.build()
        optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)
        scale_of = {
            id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]
        }
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert all(id(p) in scale_of for _, p in trainable)
        assert len(scale_of) == len(trainable)
        scales = {scale_of[id(p)] for _, p in trainable}
        assert len(scales) >= min(4, len(self.info()))
        stem = re.compile(model.group_matcher()["stem"])
        in_stem = [scale_of[id(p)] for n, p in trainable if stem.match(n)]
        assert in_stem and max(in_stem) == min(scales)
        deepest = trainable[-1][1]
        assert scale_of[id(deepest)] == max(scales) == 1.0

    def test_timms_ema_and_load_checkpoint(self, tmp_path: Any) -> None:
        """timm's ModelEmaV3 tracks the model and timm.models.load_checkpoint loads its
        own state_dict back, by the same names."""
        from timm.models import load_checkpoint
        from timm.utils import ModelEmaV3

        model = self.build().train()
        ema = ModelEmaV3(model, decay=0.5)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = torch.stack([m.float().pow(2).mean() for m in _tensors(model(self.input()))]).sum()
        loss.backward()
        optimizer.step()
        ema.update(model)
        averaged = ema.module.state_dict()
        for name, value in model.state_dict().items():
            assert averaged[name].shape == value.shape, name
        path = tmp_path / "model.pth"
        torch.save(model.state_dict(), path)
        other = self.build()
        load_checkpoint(other, str(path))
        for name, value in model.state_dict().items():
            torch.testing.assert_close(other.state_dict()[name], value, rtol=0, atol=0)

    # -- training (docs/training.md) --------------------------------------------------

    def _train_steps(self, model: Any, steps: int = 3) -> None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        for _ in range(steps):
            maps = _tensors(model(self.input()))
            loss = torch.stack([m.float().pow(2).mean() for m in maps]).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @staticmethod
    def _batch_norms(model: Any) -> dict[str, nn.Module]:
        return {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        }

    def test_freeze_trains_only_the_later_levels(self) -> None:
        """mmdetection's ``frozen_stages`` (docs/training.md): frozen parameters get no
        gradient and do not move, the frozen part stays in eval mode (its BatchNorm
        statistics stay), and the rest learns, its BatchNorms updating: a few SGD
        steps in train mode."""
        torch.manual_seed(0)
        model = self.build().train()
        model.freeze(0)
        model.train()  # the frozen part stays in eval through later .train() calls
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert frozen and trainable
        norms = self._batch_norms(model)
        held = {n for n, m in norms.items() if m.weight is not None and not m.weight.requires_grad}
        stats = {n: m.running_mean.clone() for n, m in norms.items()}
        before = {n: p.detach().clone() for n, p in trainable.items()}
        self._train_steps(model)
        for name, value in frozen.items():
            parameter = model.get_parameter(name)
            assert parameter.grad is None and torch.equal(parameter, value), name
        assert any(not torch.equal(before[n], p) for n, p in trainable.items())
        for name in held:
            assert not norms[name].training and torch.equal(norms[name].running_mean, stats[name])
        moving = [n for n in norms if n not in held]
        if moving:
            assert all(norms[n].training for n in moving)
            assert any(not torch.equal(norms[n].running_mean, stats[n]) for n in moving)

    def test_mmdetection_frozen_stages_and_norm_eval(self) -> None:
        """mmdetection's detection configs say ``frozen_stages=1, norm_eval=True``: every
        BatchNorm of the backbone keeps its running statistics through training
        steps, whatever is frozen, while the unfrozen weights change."""
        torch.manual_seed(0)
        model = self.build(frozen_levels=1, norm_eval=True).train()
        norms = self._batch_norms(model)
        stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert trainable
        self._train_steps(model)
        for name, norm in norms.items():
            assert not norm.training, name
            assert torch.equal(norm.running_mean, stats[name][0]), name
            assert torch.equal(norm.running_var, stats[name][1]), name
        assert any(not torch.equal(model.get_parameter(n), value) for n, value in trainable.items())
        norm_modules = [m for m in model.modules() if "Norm" in type(m).__name__]
        assert all(not m.training for m in norm_modules)

    def test_grad_checkpointing_gives_the_same_outputs_and_gradients(self) -> None:
        """Recomputing in backward changes no number (timm's set_grad_checkpointing,
        on every runner), in forward and forward_intermediates."""
        torch.manual_seed(0)
        plain = self.build().train()
        checkpointed = copy.deepcopy(plain)
        checkpointed.set_grad_checkpointing(True)
        assert checkpointed.grad_checkpointing
        x = self.input()
        found = []
        for model in (plain, checkpointed):
            torch.manual_seed(1)
            maps = _tensors(model(x))
            torch.manual_seed(2)
            final, more = model.forward_intermediates(x, indices=(0, -1))
            total = torch.stack([m.float().pow(2).mean() for m in [*maps, *more, final]]).sum()
            total.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            found.append(([*maps, *more, final], grads))
        (maps_a, grads_a), (maps_b, grads_b) = found
        for a, b in zip(maps_a, maps_b, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name, grad in grads_a.items():
            torch.testing.assert_close(grad, grads_b[name], rtol=0, atol=0, msg=name)
        checkpointed.set_grad_checkpointing(False)
        assert not checkpointed.grad_checkpointing

    def test_device_and_dtype_at_creation(self) -> None:
        """create_model(device=, dtype=) builds there: the same weights as a float32
        build, cast; a module passed in is moved by its owner, not here."""
        if callable(self.name):
            with pytest.raises(unifeat.UnsupportedOptionError, match="already built"):
                self.build(dtype=torch.float64)
            return
        torch.manual_seed(0)
        made = self.build(device="cpu", dtype=torch.float64).eval()
        torch.manual_seed(0)
        reference = self.build().eval()
        assert all(p.dtype == torch.float64 for p in made.parameters())
        for (name, ours), theirs in zip(
            made.state_dict().items(), reference.state_dict().values(), strict=True
        ):
            if ours.is_floating_point():
                torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=0, msg=name)
        with pytest.raises(unifeat.UnsupportedOptionError, match="dtype"):
            self.build(dtype=torch.int64)

    def test_channels_last_gives_the_same_maps(self) -> None:
        model = self.build().eval()
        x = self.input()
        with torch.no_grad():
            expected = _tensors(model(x))
            model = model.to(memory_format=torch.channels_last)
            found = _tensors(model(x.contiguous(memory_format=torch.channels_last)))
        for ours, theirs in zip(found, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    def test_freeze_everything_then_unfreeze(self) -> None:
        model = self.build()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model.freeze(-1)
        assert not any(p.requires_grad for p in model.parameters())
        model.unfreeze().train()
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
        assert all(m.training for m in model.modules())

    def test_norm_eval_alone_holds_every_norm_layer(self) -> None:
        model = self.build().freeze(None, norm_eval=True).train()
        assert all(p.requires_grad for p in model.parameters())
        norms = [m for m in model.modules() if "Norm" in type(m).__name__]
        assert norms and not any(m.training for m in norms)
        assert all(m.training for m in model.modules() if "Norm" not in type(m).__name__)

    def test_frozen_levels_at_creation_is_freeze(self) -> None:
        made = self.build(frozen_levels=1, norm_eval=True)
        later = self.build().freeze(1, norm_eval=True)
        assert [p.requires_grad for p in made.parameters()] == [
            p.requires_grad for p in later.parameters()
        ]
        with pytest.raises(unifeat.InvalidIndicesError, match="frozen_levels"):
            self.info(frozen_levels=99)

    def test_threads_each_get_their_own_features(self) -> None:
        """A model server calls one feature model from several threads at once."""
        from concurrent.futures import ThreadPoolExecutor

        model = self.build(out_indices=(0, -1))
        inputs = [torch.randn(1, 3, self.size, self.size) for _ in range(8)]
        with torch.no_grad():
            expected = [model(x) for x in inputs]
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(model, inputs))
        for mine, reference in zip(got, expected, strict=True):
            # Features of another call would differ by O(1); the fast attention path of
            # open_clip's eval mode may round differently on another thread (2e-7 seen).
            for a, b in zip(mine, reference, strict=True):
                torch.testing.assert_close(a, b)


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


def _tensors(output: Any) -> list[Tensor]:
    """The maps of a feature model's output (list or dict; prefix tokens dropped)."""
    values = list(output.values()) if isinstance(output, dict) else list(output)
    return [v[0] if isinstance(v, tuple) else v for v in values]
