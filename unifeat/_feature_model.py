"""What every feature model has in common, whatever its backend.

A backend's feature model wraps the source model under ``self.model`` and
implements ``forward``, ``forward_intermediates`` and
``prune_intermediate_layers``. This base class provides the rest once:

* output formatting (list or dict, NCHW or NHWC, prefix tokens);
* ``state_dict`` keys equal to the *source* model's, so checkpoints written for
  the source model load into the feature model and back (keys of pruned
  modules in such a checkpoint are accepted and ignored);
* the parameter-sharing copy used when a user passes in a module.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, cast

from torch import Tensor, nn

from unifeat._errors import InvalidIndicesError, UnsupportedOptionError
from unifeat._feature_info import FeatureInfo
from unifeat._indices import normalize_indices

FeatureMap = Tensor | tuple[Tensor, Tensor]
"""A map, or ``(map, prefix_tokens)`` when prefix tokens were asked for."""
Features = list[FeatureMap] | dict[str, FeatureMap]

_INNER = "model"


def share_parameters_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the same tensors.

    Pruning or re-wiring the copy never touches the user's module, yet training
    the feature model trains the user's weights, as torchvision's extractor does.
    """
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


def attach_image_transform(model: nn.Module, transform: Any) -> None:
    """Record the source library's own preprocessing (a callable PIL image -> CHW
    tensor) on ``model``, for :func:`unifeat.extract` and
    :func:`unifeat.plot_feature_maps`. Not registered as a submodule: it is no
    part of the model's state."""
    object.__setattr__(model, "_image_transform", transform)


def image_transform(model: nn.Module) -> Any:
    """The preprocessing :func:`attach_image_transform` recorded, or None."""
    return model.__dict__.get("_image_transform")


def to_format(tensor: Tensor, output_fmt: str) -> Tensor:
    """NCHW -> NHWC when asked; adapters hand maps over in NCHW."""
    return tensor.permute(0, 2, 3, 1) if output_fmt == "NHWC" else tensor


def _state_dict_to_source_keys(
    module: FeatureModel, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    inner = f"{prefix}{_INNER}."
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(inner) :] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        renamed = OrderedDict()
        for key, value in metadata.items():
            if key == f"{prefix}{_INNER}":
                continue
            renamed[prefix + key[len(inner) :] if key.startswith(inner) else key] = value
        metadata.clear()
        metadata.update(renamed)


def _load_from_source_keys(
    module: FeatureModel,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    own = [key for key in state_dict if key.startswith(prefix)]
    for key in own:
        value = state_dict.pop(key)
        relative = key[len(prefix) :]
        if relative not in module._pruned_keys:
            state_dict[f"{prefix}{_INNER}.{relative}"] = value


class FeatureModel(nn.Module):
    """Base class of the feature models :func:`unifeat.create_model` returns.

    Attributes:
        feature_info: the levels and the ones returned (:class:`FeatureInfo`).
        backend: the backend that built the model (``"timm"``, ...).
        output_type: ``"list"`` or ``"dict"`` (keys are level module names).
        output_fmt: ``"NCHW"`` or ``"NHWC"``.
        return_prefix_tokens: whether each map comes with its prefix tokens.
    """

    feature_info: FeatureInfo
    backend: str

    def __init__(
        self,
        model: nn.Module,
        *,
        feature_info: FeatureInfo,
        backend: str,
        output_type: str = "list",
        output_fmt: str = "NCHW",
        return_prefix_tokens: bool = False,
        context: str = "the model",
        source_keys: Sequence[str] | None = None,
    ) -> None:
        """``source_keys``: the source model's state-dict keys, where ``model`` is
        not the source itself (default: ``model``'s keys)."""
        super().__init__()
        # Start in the source's mode, as torchvision's extractor does (flag only:
        # submodules keep their own, e.g. frozen norm layers).
        self.training = model.training
        self.model = model
        self.feature_info = feature_info
        self.backend = backend
        self.output_type = output_type
        self.output_fmt = output_fmt
        self.return_prefix_tokens = return_prefix_tokens
        self._context = context
        self._source_keys = tuple(self._inner_keys() if source_keys is None else source_keys)
        self._pruned_keys: frozenset[str] = frozenset()
        # Feature models compute nothing past their deepest requested level.
        self.last_level = max(feature_info.out_indices)
        self.register_state_dict_post_hook(_state_dict_to_source_keys)
        self.register_load_state_dict_pre_hook(_load_from_source_keys)

    def _inner_keys(self) -> list[str]:
        return list(nn.Module.state_dict(self.model).keys())

    def _after_prune(self) -> None:
        """Call after the inner model lost modules: their keys become ignorable."""
        self._pruned_keys = frozenset(self._source_keys) - set(self._inner_keys())

    def resolve_indices(self, indices: object) -> tuple[int, ...]:
        """Normalize ``indices`` against all levels, refusing pruned ones."""
        if indices is None:
            return self.feature_info.out_indices
        resolved = normalize_indices(
            indices, len(self.feature_info), context=self._context, what="indices"
        )
        limit = self.last_level
        too_deep = [i for i in resolved if i > limit]
        if too_deep:
            raise InvalidIndicesError(
                f"indices {tuple(resolved)} ask for level {too_deep[0]}, but {self._context} "
                f"was pruned after level {limit}: valid indices are 0..{limit}"
            )
        return resolved

    def format_features(
        self,
        maps: Sequence[FeatureMap],
        indices: Sequence[int],
        output_fmt: str | None = None,
        output_type: str | None = None,
    ) -> Features:
        """Lay out backend maps (NCHW, depth order) as asked, by default as the model says."""
        fmt = output_fmt or self.output_fmt
        laid_out: list[FeatureMap] = [
            (to_format(m[0], fmt), m[1]) if isinstance(m, tuple) else to_format(m, fmt)
            for m in maps
        ]
        if (output_type or self.output_type) == "dict":
            names = self.feature_info.module_name(list(indices))
            return dict(zip(names, laid_out, strict=True))
        return laid_out

    @property
    def default_input_size(self) -> tuple[int, int, int] | None:
        """The ``(C, H, W)`` input the source model was made for, where it says."""
        return None

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, out_indices={self.feature_info.out_indices}, "
            f"output_type={self.output_type!r}, output_fmt={self.output_fmt!r}"
        )

    # Backends implement these three (SPEC §4).
    def forward(self, x: Tensor) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        norm: bool = False,
        output_fmt: str = "NCHW",
    ) -> list[FeatureMap] | tuple[Tensor, list[FeatureMap]]:  # pragma: no cover - abstract
        """The maps of ``indices`` (over all levels; ``None`` = ``out_indices``), as a list,
        or ``(final_features, maps)`` unless ``intermediates_only`` (SPEC §4).

        Examples:
            >>> import torch, unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True).eval()
            >>> maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=(1, -1),
            ...                                    intermediates_only=True)
            >>> [tuple(m.shape) for m in maps]
            [(1, 64, 16, 16), (1, 512, 2, 2)]
        """
        raise NotImplementedError

    def prune_intermediate_layers(
        self, indices: int | Sequence[int], prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:  # pragma: no cover - abstract
        """Drop what the levels ``indices`` do not need; returns them normalized, and
        ``forward`` then returns exactly these levels.

        Examples:
            >>> import torch, unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True).eval()
            >>> model.prune_intermediate_layers((-4, 2))
            [1, 2]
            >>> [tuple(m.shape) for m in model(torch.randn(1, 3, 64, 64))]
            [(1, 64, 16, 16), (1, 128, 8, 8)]
        """
        raise NotImplementedError


class MapsFeatureModel(FeatureModel):
    """A feature model whose backend computes the maps of given levels, in one pass.

    Subclasses implement ``_maps(x, indices)`` (maps in NCHW, depth order) and
    say in ``_no_norm`` why ``norm=True`` is refused; ``forward`` and
    ``forward_intermediates`` are the same for all of them.
    """

    _no_norm = "its backend has no separate final norm"

    def _maps(self, x: Tensor, indices: Sequence[int]) -> list[FeatureMap]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor) -> Features:
        indices = self.feature_info.out_indices
        return self.format_features(self._maps(x, indices), indices)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        norm: bool = False,
        output_fmt: str = "NCHW",
    ) -> list[FeatureMap] | tuple[Tensor, list[FeatureMap]]:
        """The maps of ``indices`` (over all levels; ``None`` = ``out_indices``).

        Returns the list of maps, or ``(final_features, maps)`` unless
        ``intermediates_only``, where the final features are the deepest level
        the model still computes. ``norm=True`` is refused (see ``_no_norm``).
        """
        if norm:
            raise UnsupportedOptionError(
                f"norm=True is not available for {self._context}: {self._no_norm}"
            )
        chosen = self.resolve_indices(indices)
        wanted = chosen if intermediates_only else tuple(sorted({*chosen, self.last_level}))
        by_index = dict(zip(wanted, self._maps(x, wanted), strict=True))
        picked = [by_index[i] for i in chosen]
        laid_out = cast(list[FeatureMap], self.format_features(picked, chosen, output_fmt, "list"))
        if intermediates_only:
            return laid_out
        final = by_index[self.last_level]
        return (final[0] if isinstance(final, tuple) else final), laid_out
