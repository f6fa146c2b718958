"""The open_clip backend: the image tower of any open_clip model (``oc:ViT-B-32``).

open_clip ships ``forward_intermediates`` on its three kinds of image tower;
this adapter only says how to call them: the engine measures the levels on
the meta device and runs them natively. ``pretrained=True`` loads open_clip's
default weights for the model (``oc:ViT-B-32:openai`` names a tag); the text
tower is never built.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
from open_clip.model import _build_vision_tower
from torch import Tensor, nn

from unifeat._backends import timm as timm_backend
from unifeat._backends._base import (
    Adapter,
    NativeLevels,
    unknown_keyword,
    weights_unreachable,
)
from unifeat._engine.classifier import HeadRecipe
from unifeat._engine.levels import FeatureMap
from unifeat._engine.native import NativeSpec, measure_levels
from unifeat._engine.resize import PositionEmbedding, resample
from unifeat._errors import UnsupportedOptionError
from unifeat._options import BuildPlan

# -- ViT towers: blocks of tokens, a class token first ---------------------------------


def _position_rule(tower: Any) -> PositionEmbedding:
    """open_clip's own rule (``resize_pos_embed``): bicubic, antialiased."""
    patch = int(tower.patch_size[0])
    rows, cols = tower.grid_size
    return PositionEmbedding("positional_embedding", patch, (int(rows), int(cols)), 1)


class _Resized:
    """A ViT tower seen with its position embedding resampled for one input's grid:
    open_clip's own methods run on this view, the tower is never written (calls
    from several threads at once stay independent)."""

    def __init__(self, tower: nn.Module, positional_embedding: Tensor) -> None:
        self._tower = tower
        self.positional_embedding = positional_embedding

    def __getattr__(self, name: str) -> Any:
        function = getattr(type(self._tower), name, None)
        if inspect.isfunction(function):
            return types.MethodType(function, self)  # its methods see the view
        return getattr(self._tower, name)


def _forward_intermediates(tower: Any, x: Tensor, **kwargs: Any) -> dict[str, Any]:
    """open_clip's ``forward_intermediates`` at any multiple of the patch size; the
    tower itself at the size it was built for."""
    rule = _position_rule(tower)
    rows, cols = x.shape[-2] // rule.patch, x.shape[-1] // rule.patch
    position = resample(tower.positional_embedding, rows, cols, rule)
    if position is tower.positional_embedding:
        return dict(tower.forward_intermediates(x, **kwargs))
    view = _Resized(tower, position)
    return dict(type(tower).forward_intermediates(view, x, **kwargs))


def _vit_final(
    tower: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> tuple[Tensor, list[FeatureMap]]:
    last = len(tower.transformer.resblocks) - 1
    wanted = sorted({*indices, last})
    out = _forward_intermediates(
        tower,
        x,
        indices=wanted,
        intermediates_only=True,
        normalize_intermediates=norm,
        output_extra_tokens=True,
    )
    maps, prefixes = out["image_intermediates"], out["image_intermediates_prefix"]
    picked = [wanted.index(i) for i in indices]
    chosen: list[FeatureMap] = [(maps[i], prefixes[i]) if prefix else maps[i] for i in picked]
    tokens = torch.cat([prefixes[-1], maps[-1].flatten(2).transpose(1, 2)], dim=1)
    if not norm and tower.attn_pool is None and not tower.final_ln_after_pool:
        tokens = tower.ln_post(tokens)  # an Identity once the norm was pruned
    return tokens, chosen


def _vit_intermediates(
    tower: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> list[FeatureMap]:
    out = _forward_intermediates(
        tower,
        x,
        indices=indices,
        intermediates_only=True,
        normalize_intermediates=norm,
        output_extra_tokens=prefix,
    )
    if prefix:
        return list(zip(out["image_intermediates"], out["image_intermediates_prefix"], strict=True))
    return list(out["image_intermediates"])


def _vit_prune(tower: Any, last_level: int, keep_final: bool) -> None:
    tower.prune_intermediate_layers([last_level], prune_norm=not keep_final, prune_head=True)


_VIT = NativeSpec(_vit_intermediates, _vit_final, _vit_prune)

# -- ModifiedResNet towers: the stem and four stages ------------------------------------

_RESNET_LEVELS = ["avgpool", "layer1", "layer2", "layer3", "layer4"]


def _resnet_depth(tower: Any) -> int:
    kept = [
        name for name in _RESNET_LEVELS[1:] if not isinstance(getattr(tower, name), nn.Identity)
    ]
    return len(kept)


def _resnet_final(
    tower: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> tuple[Tensor, list[FeatureMap]]:
    wanted = sorted({*indices, _resnet_depth(tower)})
    maps = tower.forward_intermediates(x, indices=wanted, intermediates_only=True)
    maps = maps["image_intermediates"]
    return maps[-1], [maps[wanted.index(i)] for i in indices]


def _resnet_intermediates(
    tower: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> list[FeatureMap]:
    return list(
        tower.forward_intermediates(x, indices=indices, intermediates_only=True)[
            "image_intermediates"
        ]
    )


def _resnet_prune(tower: Any, last_level: int, keep_final: bool) -> None:
    for name in [*_RESNET_LEVELS[last_level + 1 :], "attnpool"]:
        setattr(tower, name, nn.Identity())


_RESNET = NativeSpec(
    _resnet_intermediates, _resnet_final, _resnet_prune, norm="its stages have no final norm"
)

# -- timm towers: the trunk is a timm model ----------------------------------------------


def _trunk_intermediates(
    tower: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> list[FeatureMap]:
    return timm_backend.TIMM.intermediates(tower.trunk, x, indices, prefix, norm)


def _trunk_final(
    tower: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> tuple[Tensor, list[FeatureMap]]:
    return timm_backend.TIMM.final(tower.trunk, x, indices, prefix, norm)


def _trunk_prune(tower: Any, last_level: int, keep_final: bool) -> None:
    timm_backend.TIMM.prune(tower.trunk, last_level, keep_final)
    tower.head = nn.Identity()  # the projection into the joint embedding


_TIMM_TOWER = NativeSpec(_trunk_intermediates, _trunk_final, _trunk_prune)


class OpenClipAdapter(Adapter):
    name = "open_clip"

    def has_model(self, name: str) -> bool:
        model, _, _tag = name.partition(":")
        return model in open_clip.list_models()

    def model_names(self) -> list[str]:
        return list(open_clip.list_models())

    def build(
        self, plan: BuildPlan, *, meta: bool, extra_kwargs: Mapping[str, Any] | None = None
    ) -> nn.Module:
        assert plan.model_name is not None
        name, _, tag = plan.model_name.partition(":")
        config = open_clip.get_model_config(name)
        vision = {**config["vision_cfg"], **plan.model_kwargs}
        for key in plan.model_kwargs:
            if key not in open_clip.model.CLIPVisionCfg.__dataclass_fields__:
                unknown_keyword(
                    key, plan, sorted(open_clip.model.CLIPVisionCfg.__dataclass_fields__)
                )
        if plan.pretrained and not meta:
            tags = open_clip.list_pretrained_tags_by_model(name)
            try:
                model = open_clip.create_model(name, pretrained=tag or (tags[0] if tags else None))
            except RuntimeError as exc:
                # open_clip reports a failed download as a RuntimeError of its own.
                if "download" not in str(exc).lower():
                    raise
                raise weights_unreachable(plan, exc) from exc
            return model.visual
        # Not meta: wherever the caller builds (device= makes random weights there).
        with torch.device("meta") if meta else contextlib.nullcontext():
            return _build_vision_tower(
                config["embed_dim"], vision, quick_gelu=config.get("quick_gelu", False)
            )

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        size = getattr(source, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else size
        return 3, int(height), int(width)

    def patch_size(self, source: nn.Module) -> int | None:
        """A ViT tower takes any multiple of its patch size (its position embedding
        resampled as open_clip's ``resize_pos_embed`` does)."""
        if isinstance(source, open_clip.transformer.VisionTransformer):
            return _position_rule(source).patch
        return None

    def fixed_input_size(self, source: nn.Module) -> tuple[int, int, int] | None:
        """A timm trunk (``timm_model_name`` towers) takes what timm's model takes."""
        trunk = getattr(source, "trunk", None)
        if isinstance(trunk, nn.Module):
            return timm_backend.TimmAdapter().fixed_input_size(trunk)
        return None

    def native(self, plan: BuildPlan, extra_kwargs: Mapping[str, Any]) -> NativeLevels | None:
        tower = self.source_on_meta(plan)
        if isinstance(tower, open_clip.transformer.VisionTransformer):
            blocks = len(tower.transformer.resblocks)
            spec, names, tokens = _VIT, [f"transformer.resblocks.{i}" for i in range(blocks)], True
        elif isinstance(tower, open_clip.modified_resnet.ModifiedResNet):
            spec, names, tokens = _RESNET, _RESNET_LEVELS, False
        else:
            trunk = tower.get_submodule("trunk")
            spec, tokens = _TIMM_TOWER, timm_backend.takes_prefix_tokens(trunk)
            names = [f"trunk.{level['module']}" for level in timm_backend.levels_of(trunk)]
        size = self.native_input_size(plan, tower)
        levels = measure_levels(tower, spec, names, size, tokens=tokens)
        return NativeLevels(spec, levels, tokens, size)

    def head_recipe(self, plan: BuildPlan, source: nn.Module) -> HeadRecipe | None:
        """A ViT tower's head as timm's ``vit_*_clip_*`` models have it: the pool
        (class token, or the mean of patch tokens) after ``ln_post``, then the
        projection ``proj`` into the joint embedding as the classifier (an
        ``nn.Parameter``, applied as ``x @ proj``), ``num_classes`` its width."""
        if isinstance(source, open_clip.modified_resnet.ModifiedResNet):
            raise UnsupportedOptionError(
                f"{plan.label} is a ModifiedResNet tower: its attention pool "
                "(attnpool) applies the output projection (attnpool.c_proj) inside one "
                "F.multi_head_attention_forward call, so it has no pre-logits features "
                "before a classifier to reset; the ViT towers (oc:ViT-B-32, ...) have "
                "the interface, and features_only=True gives this tower's features"
            )
        if not isinstance(source, open_clip.transformer.VisionTransformer):
            raise UnsupportedOptionError(
                f"{plan.label} is a timm-trunk tower ({type(source).__name__}): build "
                "its trunk with backend='timm' for timm's classifier interface, or pass "
                "features_only=True"
            )
        tower: Any = source
        pool = {"tok": "token", "avg": "avg"}.get(str(tower.pool_type))
        if tower.attn_pool is not None or pool is None:
            why = "an attention pool" if tower.attn_pool is not None else "no pooling"
            raise UnsupportedOptionError(
                f"{plan.label} has {why} (pool_type={tower.pool_type!r}): only towers "
                "that pool the class token or the mean of patch tokens have timm's "
                "classifier interface"
            )
        width = int(tower.transformer.width)
        proj = tower.proj
        return HeadRecipe(
            "tokens",
            "proj",
            num_features=width,
            head_hidden_size=width,
            num_classes=int(proj.shape[1]) if proj is not None else 0,
            default_pool=pool,
            # with final_ln_after_pool the feature model's tokens are not normed yet
            pre_logits=("ln_post",) if tower.final_ln_after_pool else (),
        )

    def image_transform(self, plan: BuildPlan, source: nn.Module) -> Any:
        """open_clip's own eval preprocessing at the tower's input size."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        stored = getattr(source, "preprocess_cfg", None) or {}
        config = PreprocessCfg(**{**stored, "size": getattr(source, "image_size", 224)})
        return image_transform_v2(config, is_train=False)
