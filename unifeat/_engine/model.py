"""The one feature model class, whatever computes the levels (a :class:`Runner`).

A runner owns how the levels are computed (a traced graph, hooks on a block
list, a library's own ``forward_intermediates``); :class:`FeatureModel` owns
everything users see and is written once: output layout (list or dict, NCHW or
NHWC, prefix tokens), the index rules of ``forward_intermediates`` and
``prune_intermediate_layers``, state-dict keys equal to the source model's,
train/eval, deepcopy and pickling.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from unifeat._engine.levels import FeatureMap, Level, off_grid
from unifeat._engine.meta import meta_batch, weightless
from unifeat._errors import InvalidIndicesError, UnsupportedOptionError
from unifeat._feature_info import FeatureInfo
from unifeat._indices import normalize_indices

Features = list[FeatureMap] | dict[str, FeatureMap]


class Runner:
    """Computes level tensors for a :class:`FeatureModel`.

    A runner is plain data: it reaches modules only through the ``root`` it is
    handed (the feature model's ``model``, which holds every parameter it uses
    under the source model's names) and keeps no per-call state. So deepcopy
    and pickle carry it, ``nn.DataParallel`` replicas run their own modules, and
    concurrent calls from threads each see their own results.
    """

    levels: tuple[Level, ...]
    last_level: int
    """The deepest level it still computes."""
    final_norm: str | None = None
    """Why ``norm=True`` is refused, or None where it is available."""
    trims: bool = True
    """Whether the root may hold parameters no level needs (a library's own code runs
    it), which :func:`unifeat._engine.trim.trim` then takes out."""
    prunes_apart: bool = False
    """Whether levels are computed apart (a pyramid's), so that pruning to the same
    deepest level may still drop others."""

    def run(
        self,
        root: nn.Module,
        x: Tensor,
        indices: Sequence[int],
        *,
        final: bool,
        norm: bool,
        prefix_tokens: bool,
        context: str,
    ) -> tuple[list[FeatureMap], Tensor | None]:
        """Maps of ``indices`` (NCHW, depth order) and, if ``final``, the final output."""
        raise NotImplementedError

    def prune(
        self,
        root: nn.Module,
        last_level: int,
        *,
        drop_final: bool,
        indices: Sequence[int] = (),
    ) -> nn.Module:
        """Compute nothing after ``last_level`` from now on; ``drop_final`` also drops
        the final norm kept for the final output; ``indices`` are all the levels
        kept (where levels do not nest, as a pyramid's). Returns the root (cut in
        place, or a new one)."""
        raise NotImplementedError

    @property
    def input_levels(self) -> tuple[Level, ...]:
        """The levels that say what input the model takes (token grids, patch size)."""
        return self.levels

    def grid_levels(self, indices: Sequence[int]) -> list[Level]:
        """The levels whose grids computing ``indices`` reads the input on."""
        return [self.levels[i] for i in indices]

    def computable(self) -> list[int]:
        """Every level it can still be asked for."""
        return list(range(self.last_level + 1))

    def depth_runner(self) -> Runner:
        """The runner whose levels order the parameters by depth (for layer decay)."""
        return self

    def set_mode(self, root: nn.Module, training: bool) -> None:
        """Called after ``FeatureModel.train(mode)`` switched every submodule's flag."""

    def level_module(self, index: int) -> str:
        """The path in the root of the module whose output level ``index`` is, where
        it is one ("" otherwise)."""
        return self.levels[index].where

    def set_grad_checkpointing(self, root: nn.Module, enable: bool) -> int:
        """Recompute each level's module in backward instead of keeping its inner
        activations; returns how many segments are checkpointed.

        The default serves runners whose library calls the level modules as
        modules (hooked block lists, libraries' own ``forward_intermediates``)."""
        from unifeat._engine.training import checkpoint_modules

        return checkpoint_modules(root, [level.where for level in self.levels], enable)


def final_norm_refusal(has_final_norm: bool, kept: bool) -> str | None:
    """Why ``norm=True`` cannot apply the final norm, or None where it can.

    A feature model holds only what its levels compute, as timm's do: the final
    norm (and whatever else maps the deepest block to ``forward_features``' output)
    only when built with ``norm=True`` (docs/levels.md, "The final output")."""
    if not has_final_norm:
        return "it has no final norm after its blocks"
    if not kept:
        return (
            "a feature model holds only what its levels compute, so its final norm was "
            "left out: build it with norm=True to keep it"
        )
    return None


def share_parameters_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the same tensors.

    Pruning or re-wiring the copy never touches the user's module, yet training
    the feature model trains the user's weights, as torchvision's extractor does.
    """
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


def to_format(tensor: Tensor, output_fmt: str) -> Tensor:
    """NCHW -> NHWC when asked; runners hand maps over in NCHW."""
    return tensor.permute(0, 2, 3, 1) if output_fmt == "NHWC" else tensor


_ALIASED = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_LEGACY_PREFIX = "model."
"""Versions before 0.2 held the source under a ``model`` child: their ``state_dict``
gave the source's keys, but tools that name tensors by ``named_parameters()``
(torch.distributed.checkpoint, EMA copies) saved them with this prefix."""


def adopt(module: nn.Module, root: nn.Module) -> None:
    """Make ``module`` hold ``root``'s parameters, buffers and submodules under
    ``root``'s own names, with no prefix of its own.

    The stores are the same dict objects (not copies), so a runner that swaps a
    submodule of ``root``, ``.to()``, ``load_state_dict``, optimizers, DDP and FSDP
    all see one model: ``named_parameters()``, ``named_modules()`` and
    ``state_dict()`` give the source's names (docs/training.md, "One name
    scheme"). ``root`` stays reachable, unregistered, for the runner; deepcopy and
    pickle keep the sharing (one memo).
    """
    state = module.__dict__
    state["_root"] = root
    for store in _ALIASED:
        state[store] = root.__dict__[store]


def root_of(module: nn.Module) -> nn.Module:
    """The module whose stores :func:`adopt` shares."""
    return cast(nn.Module, module.__dict__["_root"])


def _load_from_source_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Keys of what the model no longer holds (cut after its deepest level, or unused
    by its levels) are accepted and ignored, so the source's own checkpoints load;
    a legacy ``model.`` prefix is dropped where the key without it is the model's."""
    pruned: frozenset[str] = module.__dict__.get("_pruned_keys", frozenset())
    own = (
        set(nn.Module.state_dict(module).keys())
        if any(key.startswith(prefix + _LEGACY_PREFIX) for key in state_dict)
        else set()
    )
    for key in [key for key in state_dict if key.startswith(prefix)]:
        relative = key[len(prefix) :]
        if relative.startswith(_LEGACY_PREFIX) and relative not in own:
            unprefixed = relative[len(_LEGACY_PREFIX) :]
            if unprefixed in own or unprefixed in pruned:
                state_dict[prefix + unprefixed] = state_dict.pop(key)
                relative = unprefixed
        if relative in pruned:
            state_dict.pop(prefix + relative)


class AdoptingModule(nn.Module):
    """A module that holds another module's parameters, buffers and submodules
    (:func:`adopt`) and settings of its own."""

    own_settings: ClassVar[frozenset[str]] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        # Its own settings live in its own __dict__ even where the adopted module has a
        # submodule of that name (a ViT's ``norm``): the stores are that module's, so
        # nn.Module would take the name for the submodule.
        if name in self.own_settings:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def train(self, mode: bool = True) -> AdoptingModule:
        super().train(mode)
        root = self.__dict__.get("_root")
        if root is not None:
            root.training = mode  # not a child: its stores are this module's own
        return self


class FeatureModel(AdoptingModule):
    """The feature model :func:`unifeat.create_model` returns with ``features_only=True``.

    ``model(x)`` returns the levels ``feature_info.out_indices`` in depth order,
    as a list or a dict keyed by level module name (or ``return_nodes`` keys),
    NCHW or NHWC. The same class serves every backend.

    Attributes:
        feature_info: the levels and the ones returned (:class:`FeatureInfo`).
        backend: the backend that built the model (``"timm"``, ...).
        output_type: ``"list"`` or ``"dict"``.
        output_fmt: ``"NCHW"`` or ``"NHWC"``.
        return_prefix_tokens: whether each map comes with its prefix tokens.
        input_size: ``(C, H, W)`` the source model was made for.
        data_config: the preprocessing the source's library prescribes, where known.

    Examples:
        >>> import torch, unifeat
        >>> model = unifeat.create_model("tv:resnet18", features_only=True, out_indices=(2, 4))
        >>> [tuple(m.shape) for m in model(torch.randn(1, 3, 64, 64))]
        [(1, 128, 8, 8), (1, 512, 2, 2)]
        >>> model.feature_info.module_name()
        ['layer2', 'layer4']
    """

    own_settings = frozenset(
        {
            "feature_info",
            "backend",
            "input_size",
            "output_type",
            "output_fmt",
            "return_prefix_tokens",
            "data_config",
            "fixed_input_size",
            "patch_size",
            "grad_checkpointing",
        }
    )
    feature_info: FeatureInfo
    backend: str
    _norm_levels: bool = False
    """Whether ``forward`` applies the final norm to the levels it fits (``norm=True``
    at creation, as timm's ``FeatureGetterNet(norm=True)``)."""
    _frozen_parameters: tuple[str, ...] = ()
    _held_in_eval: tuple[str, ...] = ()
    grad_checkpointing: bool = False
    fixed_input_size: tuple[int, int, int] | None = None
    """``(patch, H, W)`` of a token model that runs at its built size only."""
    patch_size: int | None = None
    """The patch size of a token model that takes any multiple of it, where its
    levels do not say it (levels of a library's own intermediates are NCHW)."""

    def __init__(
        self,
        runner: Runner,
        root: nn.Module,
        *,
        feature_info: FeatureInfo,
        backend: str,
        input_size: tuple[int, int, int],
        output_type: str = "list",
        output_fmt: str = "NCHW",
        return_prefix_tokens: bool = False,
        context: str = "the model",
        source_keys: Sequence[str] | None = None,
        training: bool = False,
        norm: bool = False,
    ) -> None:
        """``source_keys``: the source model's state-dict keys, where the runner's
        root is not the source itself (default: the root's keys). ``norm``: the
        levels go through the final norm (the runner was made keeping it)."""
        super().__init__()
        adopt(self, root)
        self._runner = runner
        # Start in the source's mode, as torchvision's extractor does (flags only:
        # submodules keep their own, e.g. norm layers a caller froze).
        self.training = root.training = training
        runner.set_mode(root, training)
        self.feature_info = feature_info
        self.backend = backend
        self.input_size = input_size
        self.output_type = output_type
        self.output_fmt = output_fmt
        self.return_prefix_tokens = return_prefix_tokens
        self._norm_levels = norm
        self.data_config: Any = None
        self._context = context
        self._source_keys = tuple(self._inner_keys() if source_keys is None else source_keys)
        self._pruned_keys: frozenset[str] = frozenset()
        self._after_prune()
        self.register_load_state_dict_pre_hook(_load_from_source_keys)

    # -- bookkeeping ----------------------------------------------------------------------

    @property
    def last_level(self) -> int:
        """The deepest level this model still computes."""
        return self._runner.last_level

    def _inner_keys(self) -> list[str]:
        return list(nn.Module.state_dict(root_of(self)).keys())

    def _after_prune(self) -> None:
        """Keys of modules the runner dropped are accepted and ignored on load."""
        self._pruned_keys = frozenset(self._source_keys) - set(self._inner_keys())

    def resolve_indices(self, indices: object) -> tuple[int, ...]:
        """Normalize ``indices`` against all levels, refusing pruned ones.

        Examples:
            >>> import unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True, out_indices=(1, 2))
            >>> model.resolve_indices((-4, 2))
            (1, 2)
        """
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
        """Lay out runner maps (NCHW, depth order) as asked, by default as the model says."""
        fmt = output_fmt or self.output_fmt
        levels = getattr(self._runner, "levels", ())
        # A tuple is (map, prefix tokens), except where a return_nodes node returned
        # a tuple of its own (an attention's unbind of q, k, v): that stays whole.
        laid_out: list[FeatureMap] = [
            (to_format(m[0], fmt), m[1])
            if isinstance(m, tuple) and levels[index].layout != "raw"
            else self._formatted(m, fmt)
            for m, index in zip(maps, indices, strict=True)
        ]
        if (output_type or self.output_type) == "dict":
            names = self.feature_info.module_name(list(indices))
            return dict(zip(names, laid_out, strict=True))
        return laid_out

    @staticmethod
    def _formatted(value: Any, fmt: str) -> Any:
        # return_nodes picks may be anything a node returns; only maps are laid out.
        if isinstance(value, Tensor) and value.dim() == 4:
            return to_format(value, fmt)
        return value

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` input the source model was made for."""
        return self.input_size

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, out_indices={self.feature_info.out_indices}, "
            f"output_type={self.output_type!r}, output_fmt={self.output_fmt!r}"
        )

    # -- nn.Module behaviour ----------------------------------------------------------------

    def train(self, mode: bool = True) -> FeatureModel:
        super().train(mode)
        root = self.__dict__.get("_root")
        runner = self.__dict__.get("_runner")
        if runner is not None and root is not None:
            runner.set_mode(root, mode)
        for name in self.__dict__.get("_held_in_eval", ()):
            self.get_submodule(name).train(False)
        return self

    # -- training a backbone ----------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward instead of keeping them (timm's method,
        on every backend): each level's computation is one checkpointed segment, in
        ``forward`` and ``forward_intermediates`` alike, while the model trains with
        grad enabled. Outputs and gradients are the same; training memory is lower
        (figures on the docs page "Benchmarks").

        Examples:
            >>> import torch, unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True).train()
            >>> model.set_grad_checkpointing()
            >>> sum(m.mean() for m in model(torch.randn(2, 3, 64, 64))).backward()
        """
        if not isinstance(enable, bool):
            raise UnsupportedOptionError(
                f"invalid enable={enable!r} for {self._context}: expected True or False"
            )
        segments = self._runner.set_grad_checkpointing(root_of(self), enable)
        if enable and not segments:
            raise UnsupportedOptionError(
                f"gradient checkpointing is not available for {self._context}: none of its "
                "levels is a module call that can be recomputed"
            )
        self.grad_checkpointing = enable

    def freeze(self, levels: int | None = -1, norm_eval: bool = False) -> FeatureModel:
        """Stop training the levels ``0..levels``, as mmdetection's ``frozen_stages``
        does: the parameters they depend on stop requiring grad, and the modules that
        hold only such parameters stay in eval mode (BatchNorm statistics, dropout)
        even after later ``.train()`` calls.

        ``levels`` counts like ``out_indices`` (over all levels, negatives from the
        end), so ``-1`` freezes everything (mmdetection's ``-1`` freezes nothing:
        that is ``None`` here). ``norm_eval=True`` holds every normalization layer
        of the model in eval mode, whatever ``levels`` is: mmdetection's
        ``norm_eval`` (its detection configs say ``frozen_stages=1, norm_eval=True``,
        which is ``freeze(1, norm_eval=True)``). A second call replaces the first;
        :meth:`unfreeze` undoes it. Returns the model. The docs page "Training and
        deployment" compares both with mmdetection's.

        Examples:
            >>> import torch, unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True)
            >>> _ = model.freeze(1, norm_eval=True)  # the stem and layer1; every BatchNorm
            >>> conv = model.get_submodule("layer2.0.conv1")
            >>> norm = model.get_submodule("layer2.0.bn1")
            >>> model.conv1.weight.requires_grad, conv.weight.requires_grad
            (False, True)
            >>> model.train().layer1.training, norm.training, norm.weight.requires_grad
            (False, False, True)
        """
        from unifeat._engine.training import is_norm, parameters_feeding, subtrees_within

        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int)):
            raise UnsupportedOptionError(
                f"invalid levels={levels!r} for freezing {self._context}: expected a level "
                "index (-1: everything) or None (norm_eval only)"
            )
        if not isinstance(norm_eval, bool):
            raise UnsupportedOptionError(
                f"invalid norm_eval={norm_eval!r} for {self._context}: expected True or False"
            )
        self.unfreeze()
        frozen: set[str] = set()
        if levels == -1:
            frozen = {name for name, _ in self.named_parameters()}
        elif levels is not None:
            (level,) = self.resolve_indices((levels,))
            probe = meta_batch(self, self.input_size)
            # Levels 0..level: where levels do not nest (a pyramid's), each its own.
            upto = tuple(i for i in self._runner.computable() if i <= level)
            frozen = parameters_feeding(
                self,
                lambda model, x: model.forward_intermediates(
                    x, indices=upto, intermediates_only=True
                ),
                probe,
            )
        changed = []
        for name, parameter in self.named_parameters():
            if name in frozen and parameter.requires_grad:
                parameter.requires_grad_(False)
                changed.append(name)
        held = subtrees_within(self, frozen)
        if norm_eval:
            inside = tuple(f"{name}." for name in held)
            held += [
                name
                for name, module in self.named_modules()
                if name and is_norm(module) and not name.startswith(inside) and name not in held
            ]
        self._frozen_parameters = tuple(changed)
        self._held_in_eval = tuple(held)
        self.__dict__.pop("_unused_by_forward", None)
        return self.train(self.training)

    def unfreeze(self) -> FeatureModel:
        """Undo :meth:`freeze`: its parameters require grad again and the modules it
        held follow the model's mode. Parameters frozen before (by the caller) stay so."""
        for name in self.__dict__.get("_frozen_parameters", ()):
            self.get_parameter(name).requires_grad_(True)
        self._frozen_parameters = ()
        self._held_in_eval = ()
        self.__dict__.pop("_unused_by_forward", None)
        return self.train(self.training)

    def __prepare_scriptable__(self) -> nn.Module:
        raise UnsupportedOptionError(
            f"TorchScript (torch.jit.script) is not supported for {self._context}: feature "
            "models run hooks, traced graphs or Python-level library code that TorchScript "
            "cannot compile; use torch.compile, or torch.export for deployment"
        )

    # -- the timm-style interface -----------------------------------------------------------

    def check_input(self, x: object) -> None:
        """Refuse an input the model cannot take, naming it and what the model takes.

        Checked here, once for every backend, so that no library's own error (or
        worse, a silent cast or crop) reaches the caller.
        """
        if not isinstance(x, Tensor):
            raise UnsupportedOptionError(
                f"{self._context} takes a torch.Tensor of shape (N, C, H, W), "
                f"got a {type(x).__name__}"
            )
        shape = "x".join(str(d) for d in x.shape)
        channels = self.input_size[0]
        # Nodes picked by return_nodes may belong to any module, whatever it takes.
        image = not any(level.layout == "raw" for level in getattr(self._runner, "levels", ()))
        if image:
            self._check_image_batch(x, shape, channels)
        reference = next(self.parameters(), None)
        if reference is None:
            return
        if x.device != reference.device:
            raise UnsupportedOptionError(
                f"the input is on {x.device.type} but {self._context} is on "
                f"{reference.device.type}: move one of them (x.to(...) or model.to(...))"
            )
        if not image:
            return
        if not x.is_floating_point():
            raise UnsupportedOptionError(
                f"{self._context} takes a float input, got {str(x.dtype).removeprefix('torch.')}:"
                " scale and normalize it first (unifeat.create_transform gives the recipe)"
            )
        if x.dtype != reference.dtype and not torch.is_autocast_enabled(x.device.type):
            ours, theirs = (str(t).removeprefix("torch.") for t in (x.dtype, reference.dtype))
            raise UnsupportedOptionError(
                f"the input is {ours} but {self._context} is {theirs}: convert the input "
                f"(x.to({theirs})) or the model, or run under torch.autocast"
            )

    def _empty_batch(self, x: Tensor, run: Any) -> Any:
        """What ``run(model, sample)`` gives for an empty batch: shapes from one meta
        sample run through a weightless replica of this model, no data.

        Libraries reshape with ``-1`` (ambiguous with 0 elements) or assert on
        the batch, so an empty batch never reaches them; the model's weights and
        statistics are not touched, nor seen by calls in other threads.
        """
        from torch.utils._pytree import tree_map

        sample = torch.empty(1, *x.shape[1:], device="meta", dtype=x.dtype)
        with torch.no_grad():
            found = run(weightless(self).module, sample)
        return tree_map(
            lambda t: (
                torch.empty((0, *t.shape[1:]), dtype=t.dtype, device=x.device)
                if isinstance(t, Tensor)
                else t
            ),
            found,
        )

    def _check_token_size(self, height: Any, width: Any) -> None:
        """A token model's input: no smaller than a patch, a multiple of the patch
        size (position embeddings are resampled to its grid), and the built size
        where the model takes no other (a timm ViT passed in without
        ``dynamic_img_size``)."""
        fixed = self.fixed_input_size
        tokens = [lv for lv in self._runner.input_levels if lv.layout == "tokens"]
        patch = (
            fixed[0]
            if fixed is not None
            else self.patch_size or min((lv.reduction for lv in tokens), default=0)
        )
        if patch and (height < patch or width < patch):
            raise UnsupportedOptionError(
                f"{self._context} cuts its input into patches of size {patch}, so an input of "
                f"{height}x{width} is too small: give at least {patch}x{patch}"
            )
        if fixed is not None and (height, width) != fixed[1:]:
            raise UnsupportedOptionError(
                f"{self._context} was built for {fixed[1]}x{fixed[2]} inputs (patch size {patch}, "
                f"position embeddings of that grid), got {height}x{width}: resize the input, or "
                "build it for that size (img_size=..., or dynamic_img_size=True)"
            )
        # The patch grids the returned levels are read on (a plain ViT: one).
        exact = [
            lv.reduction
            for lv in self._runner.grid_levels(self.feature_info.out_indices)
            if lv.layout == "tokens" and lv.grid == "exact" and lv.reduction > 0
        ]
        grid = math.lcm(self.patch_size or 1, *exact)
        if grid > 1 and (height % grid or width % grid):
            raise off_grid(height, width, grid, context=self._context)

    def _check_image_batch(self, x: Tensor, shape: str, channels: int) -> None:
        if x.dim() != 4:
            raise UnsupportedOptionError(
                f"{self._context} takes a 4-D (N, C, H, W) batch, got a {x.dim()}-D input of "
                f"shape {shape}"
            )
        self._check_token_size(x.shape[-2], x.shape[-1])
        if x.shape[1] != channels:
            raise UnsupportedOptionError(
                f"{self._context} takes {channels} input channels, got an input of shape "
                f"{shape} ({x.shape[1]} channels)"
            )

    def forward(self, x: Tensor) -> Features:
        self.check_input(x)
        if x.shape[0] == 0:
            return cast(Features, self._empty_batch(x, FeatureModel.forward))
        indices = self.feature_info.out_indices
        maps, _ = self._runner.run(
            root_of(self),
            x,
            indices,
            final=False,
            norm=self._norm_levels,
            prefix_tokens=self.return_prefix_tokens,
            context=self._context,
        )
        return self.format_features(maps, indices)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        norm: bool = False,
        output_fmt: str = "NCHW",
    ) -> list[FeatureMap] | tuple[Tensor, list[FeatureMap]]:
        """The maps of ``indices`` and, unless ``intermediates_only``, the final output.

        ``indices`` count over all levels (``None`` = this model's ``out_indices``,
        an int ``n`` = the last ``n`` levels) and must not reach past a pruned
        level. The final output is the unpooled output of the deepest block the
        model computes, in the model's native layout; while the model still
        computes the source's last level it is what the source's
        ``forward_features`` gives (after its final norm); see the docs page
        "Levels and indices". ``norm=True`` applies the final norm to each map it
        fits; the model must have been built with ``norm=True`` (which keeps the
        norm), and as in timm the default is ``False`` whatever ``forward`` does.

        Returns:
            The list of maps, or ``(final, maps)``.

        Examples:
            >>> import torch, unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True).eval()
            >>> maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=(1, -1),
            ...                                    intermediates_only=True)
            >>> [tuple(m.shape) for m in maps]
            [(1, 64, 16, 16), (1, 512, 2, 2)]
            >>> final, maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=(1,))
            >>> tuple(final.shape)
            (1, 512, 2, 2)
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise UnsupportedOptionError(
                f"invalid output_fmt={output_fmt!r} for {self._context}: expected 'NCHW' or 'NHWC'"
            )
        for flag, value in (("intermediates_only", intermediates_only), ("norm", norm)):
            if not isinstance(value, bool):
                raise UnsupportedOptionError(
                    f"invalid {flag}={value!r} for {self._context}: expected True or False"
                )
        self.check_input(x)
        if x.shape[0] == 0:
            return cast(
                Any,
                self._empty_batch(
                    x,
                    lambda model, sample: model.forward_intermediates(
                        sample, indices, intermediates_only, norm, output_fmt
                    ),
                ),
            )
        if norm and self._runner.final_norm is not None:
            raise UnsupportedOptionError(
                f"norm=True is not available for {self._context}: {self._runner.final_norm}"
            )
        chosen = self.resolve_indices(indices)
        maps, final = self._runner.run(
            root_of(self),
            x,
            chosen,
            final=not intermediates_only,
            norm=norm,
            prefix_tokens=self.return_prefix_tokens,
            context=self._context,
        )
        laid_out = cast(list[FeatureMap], self.format_features(maps, chosen, output_fmt, "list"))
        if intermediates_only:
            return laid_out
        assert final is not None
        return final, laid_out

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what the levels ``indices`` do not need; returns them normalized, and
        ``forward`` then returns exactly these levels.

        A feature model has no classifier head, so ``prune_head`` changes nothing;
        ``prune_norm=True`` also drops the final norm kept for
        ``forward_intermediates``' final output.

        Examples:
            >>> import torch, unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True).eval()
            >>> model.prune_intermediate_layers((-4, 2))
            [1, 2]
            >>> [tuple(m.shape) for m in model(torch.randn(1, 3, 64, 64))]
            [(1, 64, 16, 16), (1, 128, 8, 8)]
        """
        chosen = self.resolve_indices(indices)
        deepest = max(chosen)
        if deepest < self.last_level or prune_norm or self._runner.prunes_apart:
            from unifeat._engine.trim import trim

            root = self._runner.prune(root_of(self), deepest, drop_final=prune_norm, indices=chosen)
            trim(self._runner, root, self.input_size, context=self._context)
            adopt(self, root)
            if prune_norm:
                self._norm_levels = False
            self.__dict__.pop("_unused_by_forward", None)
            self.__dict__.pop("_depth_groups", None)
        self.feature_info = self.feature_info.from_other(chosen)
        self._after_prune()
        return list(chosen)

    # -- timm's training tools ----------------------------------------------------------------

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes over the parameter names, from the stem to the deepest level, in
        timm's format: what ``timm.optim.create_optimizer_v2(model, layer_decay=...)``
        reads for layer-wise learning-rate decay. A timm model's own table where it
        has one; otherwise the stem, then one group per block (per stage with
        ``coarse=True``), grouped by which level first needs each parameter. The
        docs page "Training and deployment" shows the recipe.

        Examples:
            >>> import unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True)
            >>> import re
            >>> matcher = model.group_matcher()
            >>> [bool(re.match(matcher["stem"], n)) for n in ("bn1.bias", "layer1.0.bn1.bias")]
            [True, False]
            >>> len(matcher["blocks"]), len(model.group_matcher(coarse=True)["blocks"])
            (8, 4)
        """
        if not isinstance(coarse, bool):
            raise UnsupportedOptionError(
                f"invalid coarse={coarse!r} for {self._context}: expected True or False"
            )
        own = getattr(root_of(self), "group_matcher", None)
        if self.backend == "timm" and callable(own):
            return cast(dict[str, Any], own(coarse=coarse))
        from unifeat._engine.groups import as_group_matcher, depth_groups

        cached = self.__dict__.get("_depth_groups")
        if cached is None:
            runner = self._runner.depth_runner()
            indices = list(range(runner.last_level + 1))

            def levels(model: nn.Module, x: Tensor) -> list[FeatureMap]:
                maps, _ = runner.run(
                    root_of(model),
                    x,
                    indices,
                    final=False,
                    norm=False,
                    prefix_tokens=False,
                    context="",
                )
                return maps

            cached = depth_groups(
                self, levels, [runner.level_module(i) for i in indices], self.input_size
            )
            self.__dict__["_depth_groups"] = cached
        return as_group_matcher(self, cached, coarse=coarse)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the library keeps out of weight decay (a ViT's position
        embedding and class token), as timm's and open_clip's models say; timm's
        optimizer factory reads it. Empty where the library says nothing."""
        own = getattr(root_of(self), "no_weight_decay", None)
        names = set(own()) if callable(own) else set()
        mine = {name for name, _ in self.named_parameters()}
        return {name for name in names if name in mine}

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The model's preprocessing in timm's format (``input_size``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``crop_mode``): what
        ``timm.data.resolve_model_data_config(model)`` reads, from the same source
        as :func:`unifeat.data_config`. ``default_cfg`` is the same dict.

        Examples:
            >>> import timm, unifeat
            >>> model = unifeat.create_model("tv:resnet18", features_only=True)
            >>> timm.data.resolve_model_data_config(model)["crop_pct"]
            0.875
        """
        from unifeat._data import timm_pretrained_cfg

        return timm_pretrained_cfg(self)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """:attr:`pretrained_cfg`, under timm's older name."""
        return self.pretrained_cfg

    # -- distributed training ---------------------------------------------------------------

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Parameters ``forward`` never uses (a final norm kept with ``norm=True`` for
        ``forward_intermediates``' final output): DistributedDataParallel reads this
        name and leaves them out, so its default ``find_unused_parameters=False``
        works."""
        cached = self.__dict__.get("_unused_by_forward")
        if cached is None:
            cached = _unused_by_forward(self)
            self.__dict__["_unused_by_forward"] = cached
        return list(cached)


def _unused_by_forward(model: FeatureModel) -> tuple[str, ...]:
    """Names of the trainable parameters that get no gradient from ``forward``.

    Found on the meta device with stand-ins for every tensor: nothing is
    computed, nothing of the model changes.
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return ()
    channels, height, width = model.input_size
    x = meta_batch(model, (channels, height, width))
    try:
        probe = weightless(model, trainable=True)
        outputs = probe.module(x)
        leaves = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
        tensors = [t for item in leaves for t in (item if isinstance(item, tuple) else (item,))]
        total = sum(t.float().sum() for t in tensors if isinstance(t, Tensor) and t.requires_grad)
        if not isinstance(total, Tensor):
            return tuple(trainable)
        grads = torch.autograd.grad(
            total, [probe.stand_ins[name] for name in trainable], allow_unused=True
        )
    except Exception:
        return ()  # cannot tell: leave DDP's own checks in charge
    return tuple(name for name, grad in zip(trainable, grads, strict=True) if grad is None)
