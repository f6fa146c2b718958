"""Weight mappings from timm's parameter names to torchvision's and transformers'.

Each mapping is data: ``(pattern, replacement)`` rules on timm's keys, applied
in order (first match wins), plus value transforms where the layouts differ
(ConvNeXt's layer scale, attention ``qkv`` split into ``q``/``k``/``v``). A
mapping is checked by ``load_mapped``: every key of the target model must be
filled and every value must fit, so a wrong rule fails loudly instead of
leaving a layer at its random init.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

Rules = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Mapping_:
    """How timm's state dict becomes another backend's."""

    rules: Rules = ()
    by_order: bool = False
    """Pair keys in state-dict order (same modules, other names: EfficientNet)."""
    split_qkv: tuple[str, str, str] | None = None
    """Target suffixes for the thirds of timm's fused ``qkv`` (``q_proj``, ...)."""
    ignore_target: tuple[str, ...] = ()
    """Target keys (regexes) timm has no counterpart for, left as they are."""
    reshape: tuple[str, ...] = field(default=())
    """Target keys (regexes) whose value takes the target's shape (layer scale)."""


# Replacements may hold small arithmetic on groups, ``<2*\1+1>``, evaluated
# after the groups are substituted, so that stages can be renumbered.
_ARITHMETIC = re.compile(r"<([0-9+\-*]+)>")


def _evaluate(expression: str) -> int:
    total = 0
    for sign, term in re.findall(r"([+-]?)([0-9*]+)", expression):
        product = 1
        for factor in term.split("*"):
            product *= int(factor)
        total += -product if sign == "-" else product
    return total


def _rename(key: str, rules: Rules) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            substituted = re.sub(pattern, replacement, key)
            return _ARITHMETIC.sub(lambda m: str(_evaluate(m.group(1))), substituted)
    return None


def map_state_dict(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], mapping: Mapping_
) -> dict[str, Tensor]:
    """``source`` (timm names) as a state dict for a model whose state dict is ``target``."""
    if mapping.by_order:
        if len(source) != len(target):
            raise ValueError(f"{len(source)} source keys vs {len(target)} target keys")
        return {
            key: _fit(value, target[key], key)
            for key, value in zip(target, source.values(), strict=True)
        }
    result: dict[str, Tensor] = {}
    for key, value in source.items():
        if key.endswith("num_batches_tracked") and key not in target:
            continue
        new = _rename(key, mapping.rules)
        if new is None:
            continue
        if mapping.split_qkv and new.endswith(("qkv.weight", "qkv.bias")):
            stem, _, kind = new.rpartition(".qkv.")
            for part, suffix in zip(value.chunk(3), mapping.split_qkv, strict=True):
                result[f"{stem}.{suffix}.{kind}"] = part
            continue
        result[new] = value
    for key in result:
        if key not in target:
            raise KeyError(f"mapped key {key!r} is not in the target model")
    for key, value in list(result.items()):
        if any(re.fullmatch(p, key) for p in mapping.reshape):
            value = value.reshape(target[key].shape)
        result[key] = _fit(value, target[key], key)
    return result


def _fit(value: Tensor, like: Tensor, key: str) -> Tensor:
    if value.shape != like.shape:
        if value.numel() != like.numel():
            raise ValueError(f"{key}: {tuple(value.shape)} does not fit {tuple(like.shape)}")
        value = value.reshape(like.shape)  # a 1x1 conv head stored as a linear layer
    return value


def load_mapped(model: nn.Module, source: Mapping[str, Tensor], mapping: Mapping_) -> None:
    """Load timm's ``source`` into ``model``; every target key must be covered."""
    target = model.state_dict()
    mapped = map_state_dict(source, target, mapping)
    missing = [
        key
        for key in target
        if key not in mapped
        and not key.endswith("num_batches_tracked")
        and not any(re.fullmatch(p, key) for p in mapping.ignore_target)
    ]
    if missing:
        raise KeyError(f"{len(missing)} target keys not mapped, first {missing[:3]}")
    model.load_state_dict(mapped, strict=False)


SAME_NAMES = Mapping_(rules=((r"(.*)", r"\1"),))
BY_ORDER = Mapping_(by_order=True)

# -- timm -> torchvision --------------------------------------------------------------

TV_CONVNEXT = Mapping_(
    rules=(
        (r"stem\.0\.(.*)", r"features.0.0.\1"),
        (r"stem\.1\.(.*)", r"features.0.1.\1"),
        (r"stages\.([1-3])\.downsample\.([01])\.(.*)", r"features.<2*\1>.\2.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.(.*)", r"features.<2*\1+1>.\2.block.0.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.norm\.(.*)", r"features.<2*\1+1>.\2.block.2.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.(.*)", r"features.<2*\1+1>.\2.block.3.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.(.*)", r"features.<2*\1+1>.\2.block.5.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.gamma", r"features.<2*\1+1>.\2.layer_scale"),
        (r"head\.norm\.(.*)", r"classifier.0.\1"),
        (r"head\.fc\.(.*)", r"classifier.2.\1"),
    ),
    reshape=(r".*layer_scale",),
)
TV_VIT = Mapping_(
    rules=(
        (r"cls_token", r"class_token"),
        (r"pos_embed", r"encoder.pos_embedding"),
        (r"patch_embed\.proj\.(.*)", r"conv_proj.\1"),
        (r"blocks\.(\d+)\.norm1\.(.*)", r"encoder.layers.encoder_layer_\1.ln_1.\2"),
        (r"blocks\.(\d+)\.norm2\.(.*)", r"encoder.layers.encoder_layer_\1.ln_2.\2"),
        (
            r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
            r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2",
        ),
        (
            r"blocks\.(\d+)\.attn\.proj\.(.*)",
            r"encoder.layers.encoder_layer_\1.self_attention.out_proj.\2",
        ),
        (r"blocks\.(\d+)\.mlp\.fc1\.(.*)", r"encoder.layers.encoder_layer_\1.mlp.0.\2"),
        (r"blocks\.(\d+)\.mlp\.fc2\.(.*)", r"encoder.layers.encoder_layer_\1.mlp.3.\2"),
        (r"norm\.(.*)", r"encoder.ln.\1"),
        (r"head\.(.*)", r"heads.head.\1"),
    ),
)
TV_SWIN = Mapping_(
    rules=(
        (r"patch_embed\.proj\.(.*)", r"features.0.0.\1"),
        (r"patch_embed\.norm\.(.*)", r"features.0.2.\1"),
        (r"layers\.([1-3])\.downsample\.(.*)", r"features.<2*\1>.\2"),
        (r"layers\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.(.*)", r"features.<2*\1+1>.\2.mlp.0.\3"),
        (r"layers\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.(.*)", r"features.<2*\1+1>.\2.mlp.3.\3"),
        (r"layers\.(\d)\.blocks\.(\d+)\.(.*)", r"features.<2*\1+1>.\2.\3"),
        (r"norm\.(.*)", r"norm.\1"),
        (r"head\.fc\.(.*)", r"head.\1"),
    ),
    ignore_target=(r".*relative_position_index",),
)
TV_REGNET = Mapping_(
    rules=(
        (r"stem\.conv\.(.*)", r"stem.0.\1"),
        (r"stem\.bn\.(.*)", r"stem.1.\1"),
        (
            r"s(\d)\.b(\d+)\.downsample\.conv\.(.*)",
            r"trunk_output.block\1.block\1-<\2-1>.proj.0.\3",
        ),
        (r"s(\d)\.b(\d+)\.downsample\.bn\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.proj.1.\3"),
        (r"s(\d)\.b(\d+)\.conv1\.conv\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.a.0.\3"),
        (r"s(\d)\.b(\d+)\.conv1\.bn\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.a.1.\3"),
        (r"s(\d)\.b(\d+)\.conv2\.conv\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.b.0.\3"),
        (r"s(\d)\.b(\d+)\.conv2\.bn\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.b.1.\3"),
        (r"s(\d)\.b(\d+)\.se\.fc1\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.se.fc1.\3"),
        (r"s(\d)\.b(\d+)\.se\.fc2\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.se.fc2.\3"),
        (r"s(\d)\.b(\d+)\.conv3\.conv\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.c.0.\3"),
        (r"s(\d)\.b(\d+)\.conv3\.bn\.(.*)", r"trunk_output.block\1.block\1-<\2-1>.f.c.1.\3"),
        (r"head\.fc\.(.*)", r"fc.\1"),
    ),
)

# -- timm -> transformers -------------------------------------------------------------

HF_RESNET = Mapping_(
    rules=(
        (r"conv1\.(.*)", r"embedder.embedder.convolution.\1"),
        (r"bn1\.(.*)", r"embedder.embedder.normalization.\1"),
        (
            r"layer(\d)\.(\d+)\.downsample\.0\.(.*)",
            r"encoder.stages.<\1-1>.layers.\2.shortcut.convolution.\3",
        ),
        (
            r"layer(\d)\.(\d+)\.downsample\.1\.(.*)",
            r"encoder.stages.<\1-1>.layers.\2.shortcut.normalization.\3",
        ),
        (
            r"layer(\d)\.(\d+)\.conv(\d)\.(.*)",
            r"encoder.stages.<\1-1>.layers.\2.layer.<\3-1>.convolution.\4",
        ),
        (
            r"layer(\d)\.(\d+)\.bn(\d)\.(.*)",
            r"encoder.stages.<\1-1>.layers.\2.layer.<\3-1>.normalization.\4",
        ),
    ),
)
HF_CONVNEXT = Mapping_(
    rules=(
        (r"stem\.0\.(.*)", r"embeddings.patch_embeddings.\1"),
        (r"stem\.1\.(.*)", r"embeddings.layernorm.\1"),
        (r"stages\.(\d)\.downsample\.(\d)\.(.*)", r"encoder.stages.\1.downsampling_layer.\2.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.(.*)", r"encoder.stages.\1.layers.\2.dwconv.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.norm\.(.*)", r"encoder.stages.\1.layers.\2.layernorm.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.(.*)", r"encoder.stages.\1.layers.\2.pwconv1.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.(.*)", r"encoder.stages.\1.layers.\2.pwconv2.\3"),
        (
            r"stages\.(\d)\.blocks\.(\d+)\.gamma",
            r"encoder.stages.\1.layers.\2.layer_scale_parameter",
        ),
        (r"head\.norm\.(.*)", r"layernorm.\1"),
    ),
)
HF_VIT = Mapping_(
    rules=(
        (r"cls_token", r"embeddings.cls_token"),
        (r"pos_embed", r"embeddings.position_embeddings"),
        (r"patch_embed\.proj\.(.*)", r"embeddings.patch_embeddings.projection.\1"),
        (r"blocks\.(\d+)\.norm1\.(.*)", r"layers.\1.layernorm_before.\2"),
        (r"blocks\.(\d+)\.norm2\.(.*)", r"layers.\1.layernorm_after.\2"),
        (r"blocks\.(\d+)\.attn\.qkv\.(.*)", r"layers.\1.attention.qkv.\2"),
        (r"blocks\.(\d+)\.attn\.proj\.(.*)", r"layers.\1.attention.o_proj.\2"),
        (r"blocks\.(\d+)\.mlp\.(fc\d)\.(.*)", r"layers.\1.mlp.\2.\3"),
        (r"norm\.(.*)", r"layernorm.\1"),
    ),
    split_qkv=("q_proj", "k_proj", "v_proj"),
    ignore_target=(r"pooler\..*",),
)
HF_SWIN = Mapping_(
    rules=(
        (r"patch_embed\.proj\.(.*)", r"embeddings.patch_embeddings.projection.\1"),
        (r"patch_embed\.norm\.(.*)", r"embeddings.norm.\1"),
        # timm downsamples at the start of a stage, transformers at the end of the one before.
        (r"layers\.(\d)\.downsample\.(.*)", r"encoder.layers.<\1-1>.downsample.\2"),
        (
            r"layers\.(\d)\.blocks\.(\d+)\.norm1\.(.*)",
            r"encoder.layers.\1.blocks.\2.layernorm_before.\3",
        ),
        (
            r"layers\.(\d)\.blocks\.(\d+)\.norm2\.(.*)",
            r"encoder.layers.\1.blocks.\2.layernorm_after.\3",
        ),
        (
            r"layers\.(\d)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
            r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table",
        ),
        (
            r"layers\.(\d)\.blocks\.(\d+)\.attn\.qkv\.(.*)",
            r"encoder.layers.\1.blocks.\2.attention.qkv.\3",
        ),
        (
            r"layers\.(\d)\.blocks\.(\d+)\.attn\.proj\.(.*)",
            r"encoder.layers.\1.blocks.\2.attention.o_proj.\3",
        ),
        (
            r"layers\.(\d)\.blocks\.(\d+)\.mlp\.(fc\d)\.(.*)",
            r"encoder.layers.\1.blocks.\2.mlp.\3.\4",
        ),
        (r"norm\.(.*)", r"layernorm.\1"),
    ),
    split_qkv=("q_proj", "k_proj", "v_proj"),
)
HF_DINOV2 = Mapping_(
    rules=(
        (r"cls_token", r"embeddings.cls_token"),
        (r"pos_embed", r"embeddings.position_embeddings"),
        (r"patch_embed\.proj\.(.*)", r"embeddings.patch_embeddings.projection.\1"),
        (r"blocks\.(\d+)\.(norm\d)\.(.*)", r"encoder.layer.\1.\2.\3"),
        (r"blocks\.(\d+)\.attn\.qkv\.(.*)", r"encoder.layer.\1.attention.qkv.\2"),
        (r"blocks\.(\d+)\.attn\.proj\.(.*)", r"encoder.layer.\1.attention.o_proj.\2"),
        (r"blocks\.(\d+)\.mlp\.(fc\d)\.(.*)", r"encoder.layer.\1.mlp.\2.\3"),
        (r"blocks\.(\d+)\.ls(\d)\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
        (r"norm\.(.*)", r"layernorm.\1"),
    ),
    split_qkv=("q_proj", "k_proj", "v_proj"),
    ignore_target=(r"embeddings\.mask_token",),
)
