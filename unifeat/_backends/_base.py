"""The interface every backend adapter implements, and the build template they share.

An adapter knows its model zoo and nothing else: names and listing, how to
build a model (on the meta device or for real), native switches, per-family
tables, preprocessing. Everything that follows from a validated
:class:`~unifeat._options.BuildPlan` is written once, here and in
:mod:`unifeat._engine`: finding levels, ``output_stride``, checkpoints,
copying a module passed in, making the feature model. An adapter that needs
nothing special writes no ``create()``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn, cast

import torch
from torch import nn

from unifeat._checkpoint import check_checkpoint, check_part, load_checkpoint, load_part
from unifeat._engine import levels as _levels
from unifeat._engine.classifier import ClassifierModel, HeadRecipe, check_head_options
from unifeat._engine.graph import GraphFinder, relevel
from unifeat._engine.hooks import CallingConvention, HookFinder
from unifeat._engine.layout import Finder, Layout, apply_output_stride
from unifeat._engine.levels import Level
from unifeat._engine.model import FeatureModel, share_parameters_copy
from unifeat._engine.native import NativeSpec
from unifeat._engine.pyramid import PREFIX as PYRAMID_PREFIX
from unifeat._engine.pyramid import check_pyramid, pyramid_levels
from unifeat._engine.resize import PositionEmbedding
from unifeat._engine.trim import check_norm
from unifeat._errors import (
    CheckpointError,
    TracingError,
    UnifeatError,
    UnsupportedOptionError,
    close_matches,
)
from unifeat._feature_info import FeatureInfo
from unifeat._feature_model import attach_image_transform
from unifeat._indices import IndexSpec, normalize_indices
from unifeat._options import BuildPlan

FinderKind = Literal["graph", "hooks"]

_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '([^']+)'")


def refuse_unknown_kwargs(
    exc: TypeError, plan: BuildPlan, accepted: Callable[[], list[str]]
) -> None:
    """Turn a constructor's complaint about a keyword argument it does not take into
    an :class:`UnsupportedOptionError` naming it and the close matches; any other
    ``TypeError`` is left to the caller."""
    match = _UNEXPECTED_KEYWORD.search(str(exc))
    if match is None:
        return
    unknown_keyword(match.group(1), plan, accepted())


@contextmanager
def built_with_kwargs(plan: BuildPlan) -> Iterator[None]:
    """A library's own exception from a build given constructor kwargs (a value it
    rejects, or one that fails deep inside: ``hidden_size=-1``) becomes one unifeat
    error naming the kwargs; without kwargs the library's failure stands as it is."""
    try:
        yield
    except UnifeatError:
        raise
    except Exception as exc:
        if not plan.model_kwargs:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in plan.model_kwargs.items())
        text = str(exc).strip().splitlines()
        raise UnsupportedOptionError(
            f"{plan.label} could not be built with {given}: {type(exc).__name__}: "
            f"{text[0] if text else ''}"
        ) from exc


@contextmanager
def fetching_weights(plan: BuildPlan) -> Iterator[None]:
    """A library's failure to fetch pretrained weights (offline, a hub or URL it
    cannot reach, a cache without them) becomes one :class:`CheckpointError` naming
    the model and the way out, not the hub client's own exception."""
    try:
        yield
    except UnifeatError:
        raise
    except OSError as exc:
        if not plan.pretrained:
            raise
        raise weights_unreachable(plan, exc) from exc


def weights_unreachable(plan: BuildPlan, exc: BaseException) -> CheckpointError:
    """The error for pretrained weights a library could not fetch."""
    text = str(exc).strip().splitlines()
    return CheckpointError(
        f"could not get the pretrained weights of {plan.label} ({type(exc).__name__}: "
        f"{text[0] if text else ''}): the library fetches them from its hub or URL, which "
        "this machine may not reach; pass checkpoint_path= with a local copy instead"
    )


def unknown_keyword(bad: str, plan: BuildPlan, valid: list[str]) -> NoReturn:
    similar = close_matches(bad, valid)
    hint = f"; close matches: {', '.join(similar)}" if similar else ""
    shown = ", ".join(sorted(valid)[:40]) + (" ..." if len(valid) > 40 else "")
    raise UnsupportedOptionError(
        f"unknown keyword argument {bad!r} for {plan.label}{hint} (it takes: {shown})"
    ) from None


@dataclass
class NativeLevels:
    """What a library with its own ``forward_intermediates`` says of a model."""

    spec: NativeSpec
    levels: list[Level]
    tokens: bool
    """A token model (prefix tokens can be returned)."""
    input_size: tuple[int, int, int]
    """``(C, H, W)`` the model was made for."""
    default: IndexSpec = None
    """The library's own default selection, where it is part of its contract."""
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Constructor arguments the feature model's source is built with (timm's
    ``dynamic_img_size=True``: any input size)."""


class Adapter:
    """Turns a validated :class:`BuildPlan` into a model or its metadata."""

    name: ClassVar[str]
    finder: ClassVar[FinderKind] = "graph"
    """How levels are found where the library has no ``forward_intermediates``."""

    # -- zoo knowledge: what adapters override -----------------------------------------------

    def has_model(self, name: str) -> bool:
        """Whether ``name`` (without backend prefix) is a model this backend can build."""
        return False

    def model_names(self) -> list[str]:
        """Every model name the backend knows, for listing and close matches."""
        return []

    def build(
        self, plan: BuildPlan, *, meta: bool, extra_kwargs: Mapping[str, Any] | None = None
    ) -> nn.Module:
        """The model ``plan`` names (weights only for ``meta=False``), with the
        library's own ``output_stride`` switch in ``extra_kwargs``."""
        raise UnsupportedOptionError(
            f"the {self.name!r} backend builds nothing by name: pass an nn.Module instance"
        )

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        """``(C, H, W)`` the model was made for (levels are measured there)."""
        return (3, 224, 224)

    def head_modules(self, source: nn.Module) -> tuple[str, ...]:
        """Graph finder hint: modules that are head, though the level rule would take them."""
        return ()

    def convention(self, plan: BuildPlan, source: nn.Module) -> tuple[str, CallingConvention]:
        """Hook finder hint: the trunk's path in ``source`` and how to call it."""
        return "", CallingConvention()

    def native(self, plan: BuildPlan, extra_kwargs: Mapping[str, Any]) -> NativeLevels | None:
        """The library's own intermediates for ``plan``, where it has them."""
        return None

    def native_stride(self, plan: BuildPlan, stride: int) -> dict[str, Any] | None:
        """Constructor arguments of the library's own switch for ``stride``, or None."""
        return None

    def native_strides(self, plan: BuildPlan) -> list[int]:
        """The strides the library's own switch reaches (for messages)."""
        return []

    def fixed_input_size(self, source: nn.Module) -> tuple[int, int, int] | None:
        """``(patch, H, W)`` where the model runs at its built size only (a timm ViT
        without ``dynamic_img_size``), so that another size is refused up front."""
        return None

    def patch_size(self, source: nn.Module) -> int | None:
        """The patch size of a token model that takes any multiple of it (height and
        width), where its levels do not say it (a library's own intermediates)."""
        return None

    def position_embedding(self, source: nn.Module) -> PositionEmbedding | None:
        """Graph finder hint: the learned position embedding of a traced token model,
        resampled at other input sizes (torchvision's ViT)."""
        return None

    def tracer_options(self, plan: BuildPlan, source: nn.Module) -> dict[str, Any] | None:
        """Graph finder hint: the tracer options for ``source``: the user's
        ``tracer_kwargs``, and where the adapter wants a ``torchvision.ops`` module
        traced into rather than kept whole, ``trace_through`` (its classes)."""
        return plan.tracer_kwargs

    def level_twin(self, plan: BuildPlan, source: nn.Module) -> nn.Module | None:
        """A weightless build of ``source``'s architecture without the dilation its
        library builds in (torchvision's segmentation ResNets), or None.

        A dilated net keeps one map size over several stages, so its own graph
        shows fewer stages than it has; its levels are found on the twin (same
        module names, same node names) and measured on ``source``: a DeepLabV3
        ResNet-50 has ResNet-50's five levels at reductions 2, 4, 8, 8, 8."""
        return None

    def as_source(self, module: nn.Module) -> nn.Module:
        """What unifeat reads for a module passed in: the module itself, or a view of
        it under the same names where only part of it maps images to features (a
        torchvision detection model's backbone)."""
        return module

    def image_transform(self, plan: BuildPlan, source: nn.Module) -> Any:
        """The preprocessing the library prescribes for ``source`` (PIL image -> tensor),
        where it says."""
        return None

    def whole_model(self, plan: BuildPlan, source: nn.Module) -> nn.Module:
        """What ``features_only=False`` returns: the library's own model."""
        if plan.module is None:
            cast(Any, source).backend = self.name
        return source

    def head_recipe(self, plan: BuildPlan, source: nn.Module) -> HeadRecipe | None:
        """Where ``source``'s classifier head is (module paths), for the classifier
        model ``features_only=False`` returns; None: the head is not known, and the
        library's own model is returned."""
        return None

    def check_kwargs(self, plan: BuildPlan) -> None:
        """Refuse constructor keyword arguments the model does not take, before building."""

    # -- the template ----------------------------------------------------------------------------

    def source_on_meta(self, plan: BuildPlan) -> nn.Module:
        """The source without weights (meta device); a module passed in as it is
        (finders probe weightless replicas of it, never the module itself)."""
        if plan.module is not None:
            return self.as_source(plan.module)
        with built_with_kwargs(plan):
            return self.build(plan, meta=True)

    def input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        """The one input size of a build: ``input_size=`` where given, else the model's own."""
        return _with_input_size(self.native_input_size(plan, source), plan)

    def describe(self, plan: BuildPlan) -> FeatureInfo:
        """The feature levels ``plan`` would give, without allocating weights.

        Also validates everything the model decides (index range,
        ``output_stride``, a checkpoint's keys), so that a failing plan fails
        before any real build, with the error ``create`` would raise.
        """
        layout = self.layout(plan)
        if plan.frozen_levels is not None and plan.frozen_levels != -1:
            normalize_indices(
                (plan.frozen_levels,), len(layout.info), context=plan.label, what="frozen_levels"
            )
        if plan.checkpoint_path is not None or plan.norm:
            source = self.source_on_meta(plan)
            # One runner serves every check: making one compiles its graph.
            runner, root = layout.make_runner(
                share_parameters_copy(source), context=plan.label, keep_final=plan.norm
            )
            if plan.norm:
                check_norm(runner, root, layout, context=plan.label)
            if plan.checkpoint_path is not None:
                aside = check_checkpoint(
                    source,
                    plan.checkpoint_path,
                    context=plan.label,
                    optional=self._keys_cut_away(plan, layout, source, root),
                    set_aside=PYRAMID_PREFIX if layout.pyramid else None,
                )
                if aside:
                    check_part(
                        root.get_submodule(PYRAMID_PREFIX),
                        aside,
                        plan.checkpoint_path,
                        context=plan.label,
                    )
        return layout.info

    def _load_checkpoint(
        self, plan: BuildPlan, layout: Layout | None, source: nn.Module
    ) -> dict[str, Any]:
        """Load ``plan``'s checkpoint into ``source``; returns the keys of a pyramid's
        layers (a unifeat feature model's own checkpoint), loaded once it exists."""
        assert plan.checkpoint_path is not None
        optional = self._keys_cut_away(plan, layout, source)
        return load_checkpoint(
            source,
            plan.checkpoint_path,
            context=plan.label,
            optional=optional,
            set_aside=PYRAMID_PREFIX if layout is not None and layout.pyramid else None,
        )

    @staticmethod
    def _keys_cut_away(
        plan: BuildPlan, layout: Layout | None, source: nn.Module, root: nn.Module | None = None
    ) -> frozenset[str]:
        """The source's state-dict keys the feature model of ``plan`` does not keep
        (what follows its deepest level): a checkpoint may lack them, so that a
        feature model's own ``state_dict()`` loads back as ``checkpoint_path``.
        ``root``: the root of a runner already made for ``plan`` over ``source``."""
        if not plan.features_only or layout is None:
            return frozenset()
        if root is None:
            # A structural copy (tensors shared): cutting it leaves ``source`` whole.
            _, root = layout.make_runner(
                share_parameters_copy(source), context=plan.label, keep_final=plan.norm
            )
        kept = set(nn.Module.state_dict(root).keys())
        return frozenset(nn.Module.state_dict(source).keys()) - kept

    def node_names(self, plan: BuildPlan) -> tuple[list[str], list[str]]:
        """Train and eval node names: FX's where the model traces, module paths otherwise."""
        self._refuse_instance_kwargs(plan)
        source = self.source_on_meta(plan)
        size = self.input_size(plan, source)
        finder = self._finder(plan, source, size, self.node_finder(plan), need_levels=False)
        if isinstance(finder, GraphFinder):
            return finder.node_names()
        names = finder.node_names()
        return list(names), list(names)

    def node_finder(self, plan: BuildPlan) -> FinderKind:
        """How ``return_nodes`` and node names are served."""
        return self.finder

    def layout(self, plan: BuildPlan) -> Layout:
        """Levels, FeatureInfo and the runner to make, all found on the meta device."""
        self._refuse_instance_kwargs(plan)
        self.check_kwargs(plan)
        context = plan.label
        runner_class = plan.feature_cls
        wants_native = plan.return_nodes is None and runner_class != "hook"
        native = self.native(plan, {}) if wants_native else None
        self._check_feature_cls(plan, native)
        if native is not None and runner_class != "fx":
            return self._native_layout(plan, native)
        source = self.source_on_meta(plan)
        size = self.input_size(plan, source)
        if runner_class == "fx":
            kind: FinderKind = "graph"
        else:
            kind = self.node_finder(plan) if plan.return_nodes is not None else self.finder
        try:
            finder = self._finder(plan, source, size, kind, fallback=runner_class != "fx")
        except TracingError as untraceable:
            if runner_class != "fx":
                raise
            # The model was asked to trace and did not: a TracingError, whose way out
            # is the runner unifeat would have chosen.
            raise TracingError(
                f"feature_cls='fx' reads levels off an FX graph, but {plan.label} does not "
                f"trace ({str(untraceable).split(': ', 1)[-1].split('. Ways out')[0]}): leave "
                "feature_cls out to read it with forward hooks on its block list"
            ) from None
        default: IndexSpec = None
        if plan.return_nodes is not None:
            levels = finder.node_levels(plan.return_nodes)
            indices: IndexSpec = tuple(range(len(levels)))
        elif native is not None:
            # timm's feature_cls='fx': the library's own levels, read off its FX graph.
            assert isinstance(finder, GraphFinder)
            levels, indices = finder.levels_at_modules(native.levels), plan.out_indices
            default = native.default
        else:
            levels, indices = self._levels(plan, finder, source, size), plan.out_indices
        build_kwargs: dict[str, Any] = {}

        def switch(stride: int) -> list[Level] | None:
            kwargs = self.native_stride(plan, stride) if plan.module is None else None
            if kwargs is None:
                return None
            build_kwargs.update(kwargs)
            variant = self.build(plan, meta=True, extra_kwargs=kwargs)
            return self._relevel(finder, variant, levels)

        levels, dilation = (
            apply_output_stride(
                levels,
                plan.output_stride,
                context=context,
                finder=finder,
                native_switch=switch,
                native_strides=self.native_strides(plan),
            )
            if plan.return_nodes is None
            else (levels, [])
        )
        tokens = any(level.layout == "tokens" for level in levels)
        self._check_prefix_tokens(plan, tokens)
        pyramid = self._pyramid(plan, levels)
        info = _levels.feature_info(
            pyramid or levels, indices, context=context, default=None if pyramid else default
        )
        return Layout(
            levels,
            info,
            size,
            finder.plan(levels),
            dilation=dilation,
            dilation_root=finder.trunk_path if isinstance(finder, HookFinder) else "",
            build_kwargs=build_kwargs,
            pyramid=pyramid,
        )

    def _levels(
        self, plan: BuildPlan, finder: Finder, source: nn.Module, size: tuple[int, int, int]
    ) -> list[Level]:
        """The automatic levels of ``source``: its finder's, or those of its undilated
        twin (:meth:`level_twin`) with the reductions ``source`` has."""
        twin = self.level_twin(plan, source)
        if twin is None:
            return finder.levels()
        kind: FinderKind = "graph" if isinstance(finder, GraphFinder) else "hooks"
        found = self._finder(plan, twin, size, kind, fallback=False).levels()
        shapes = finder.shapes_by_name()
        strangers = [level.where for level in found if level.where not in shapes]
        if strangers:
            raise UnsupportedOptionError(
                f"the undilated twin of {plan.label} has levels at {', '.join(strangers)}, "
                "which the model itself does not compute: its levels cannot be read off it"
            )
        return relevel(found, shapes, (size[1], size[2]))

    def _finder(
        self,
        plan: BuildPlan,
        source: nn.Module,
        size: tuple[int, int, int],
        kind: FinderKind,
        *,
        need_levels: bool = True,
        fallback: bool = True,
    ) -> Finder:
        """The finder of ``kind``; a graph that does not trace falls back to hooks on
        the model's block list (unless ``fallback`` is off: ``feature_cls='fx'``),
        and the tracing error stands where that fails too.

        Module paths (``return_nodes``, node names) need no block list: only
        automatic levels do (``need_levels``)."""
        if kind == "graph":
            try:
                return GraphFinder(
                    source,
                    input_size=size,
                    context=plan.label,
                    head_modules=self.head_modules(source),
                    position_embedding=self.position_embedding(source),
                    tracer_options=self.tracer_options(plan, source),
                )
            except TracingError as untraceable:
                if not fallback:
                    raise
                try:
                    hooks = self._hook_finder(plan, source, size)
                    if need_levels and plan.return_nodes is None:
                        hooks.levels()
                    return hooks
                except UnsupportedOptionError:
                    raise untraceable from None
        return self._hook_finder(plan, source, size)

    def _hook_finder(
        self, plan: BuildPlan, source: nn.Module, size: tuple[int, int, int]
    ) -> HookFinder:
        trunk, convention = self.convention(plan, source)
        return HookFinder(
            source, trunk_path=trunk, convention=convention, input_size=size, context=plan.label
        )

    def _relevel(self, finder: Finder, variant: nn.Module, levels: list[Level]) -> list[Level]:
        """The same levels in a build with the library's own dilation switch."""
        if isinstance(finder, GraphFinder):
            return relevel(levels, finder.remeasure(variant, retrace=True), finder.size)
        trunk, convention = finder.trunk_path, finder.convention
        again = HookFinder(
            variant,
            trunk_path=trunk,
            convention=convention,
            input_size=finder.input_size,
            context=finder.context,
        )
        shapes = {r.path: r.output for r in again.records}
        return relevel(levels, {lv.where: shapes.get(lv.where) for lv in levels}, finder.size)

    def _native_layout(self, plan: BuildPlan, native: NativeLevels) -> Layout:
        build_kwargs: dict[str, Any] = dict(native.build_kwargs)

        def switch(stride: int) -> list[Level] | None:
            kwargs = self.native_stride(plan, stride)
            if kwargs is None:
                return None
            build_kwargs.update(kwargs)
            strided = self.native(plan, kwargs)
            return strided.levels if strided is not None else None

        levels, _ = apply_output_stride(
            native.levels,
            plan.output_stride,
            context=plan.label,
            finder=None,
            native_switch=switch,
            native_strides=self.native_strides(plan),
            tokens=native.tokens,
        )
        self._check_prefix_tokens(plan, native.tokens)
        pyramid = self._pyramid(plan, levels)
        info = _levels.feature_info(
            pyramid or levels,
            plan.out_indices,
            context=plan.label,
            default=None if pyramid else native.default,
        )
        return Layout(
            levels,
            info,
            _with_input_size(native.input_size, plan),
            native.spec,
            build_kwargs=build_kwargs,
            pyramid=pyramid,
        )

    @staticmethod
    def _pyramid(plan: BuildPlan, levels: list[Level]) -> list[Level] | None:
        """The levels of ``plan``'s pyramid on ``levels``, or None without one."""
        if plan.pyramid is None:
            return None
        check_pyramid(plan.pyramid, levels, context=plan.label)
        return pyramid_levels(levels[-1])

    def _check_feature_cls(self, plan: BuildPlan, native: NativeLevels | None) -> None:
        """timm's ``feature_cls`` values this model takes (docs/migrating.md, "feature_cls"):
        ``'getter'`` is a library's own ``forward_intermediates`` (timm, open_clip);
        ``'fx'`` a traced graph; ``'hook'`` forward hooks on the block list, which
        unifeat runs for models FX cannot trace (transformers)."""
        chosen = plan.feature_cls
        if chosen == "getter" and native is None and plan.return_nodes is None:
            raise UnsupportedOptionError(
                f"feature_cls='getter' runs a library's own forward_intermediates, which "
                f"{plan.label} does not have (timm and open_clip models do); unifeat's "
                f"{'graph' if self.finder == 'graph' else 'hook'} runner gives it the same "
                "interface: leave feature_cls out"
            )
        if chosen == "fx" and self.finder == "hooks":
            raise UnsupportedOptionError(
                f"feature_cls='fx' reads levels off an FX graph, but FX cannot trace the "
                f"models of backend {self.name!r}: unifeat reads {plan.label} with forward "
                "hooks on its block list (feature_cls='hook', the default): leave "
                "feature_cls out"
            )
        if chosen == "hook" and self.finder != "hooks":
            raise UnsupportedOptionError(
                f"feature_cls='hook' reads levels with forward hooks on a block list, which "
                f"unifeat does for models FX cannot trace (transformers); {plan.label} is "
                f"read {'through its library' if native is not None else 'off its FX graph'}, "
                "with the same levels: leave feature_cls out, or pass return_nodes= to pick "
                "modules"
            )

    @staticmethod
    def _check_prefix_tokens(plan: BuildPlan, tokens: bool) -> None:
        if plan.return_prefix_tokens and not tokens:
            raise UnsupportedOptionError(
                f"return_prefix_tokens=True needs a token model with prefix tokens, but "
                f"{plan.label} returns plain feature maps"
            )

    @staticmethod
    def _refuse_instance_kwargs(plan: BuildPlan) -> None:
        if plan.module is not None and plan.model_kwargs:
            names = ", ".join(sorted(plan.model_kwargs))
            raise UnsupportedOptionError(
                f"keyword arguments {names} go to a model's constructor, but {plan.label} is "
                "already built: pass them when you build it (unifeat takes input_size=, "
                "return_nodes= and tracer_kwargs= for modules passed in)"
            )

    def create(self, plan: BuildPlan) -> nn.Module:
        """The backend's own model (``features_only=False``) or a feature model."""
        return self._build(plan, keep_final=plan.norm)

    def _build(self, plan: BuildPlan, *, keep_final: bool) -> nn.Module:
        """:meth:`create`; ``keep_final``: the feature model also keeps what maps its
        deepest block to the final output (its final norm), as a classifier needs."""
        if not plan.features_only and (
            plan.num_classes is not None or plan.global_pool is not None
        ):
            # timm's classifier options ask for timm's interface; without them the
            # library's own model comes back, as its own tools expect it.
            classifier = self._classifier_model(plan)
            if classifier is not None:
                return classifier
        # Everything that depends on the model is checked on a meta build first,
        # so that a failing call builds nothing and touches nothing.
        needs_layout = plan.features_only or plan.output_stride is not None
        layout = self.layout(plan) if needs_layout else None
        if not needs_layout:
            self._refuse_instance_kwargs(plan)
            self.check_kwargs(plan)
        source, pyramid_state = self._real_source(plan, layout)
        if layout is not None:
            layout.apply_dilation(source)
        if not plan.features_only:
            return self.whole_model(plan, source)
        assert layout is not None
        source_keys = tuple(nn.Module.state_dict(source).keys())
        training = source.training
        runner, root = layout.make_runner(source, context=plan.label, keep_final=keep_final)
        if plan.norm:
            check_norm(runner, root, layout, context=plan.label)
        if pyramid_state:
            assert plan.checkpoint_path is not None
            load_part(
                root.get_submodule(PYRAMID_PREFIX),
                pyramid_state,
                plan.checkpoint_path,
                context=plan.label,
            )
        model = FeatureModel(
            runner,
            root,
            feature_info=layout.info,
            backend=self.name,
            input_size=layout.input_size,
            output_type=plan.output_type or ("dict" if plan.return_nodes is not None else "list"),
            output_fmt=plan.output_fmt,
            return_prefix_tokens=plan.return_prefix_tokens,
            context=plan.label,
            source_keys=source_keys,
            training=training,
            norm=plan.norm,
        )
        transform = self.image_transform(plan, source)
        if transform is not None:
            attach_image_transform(model, transform)
        model.fixed_input_size = self.fixed_input_size(source)
        model.patch_size = self.patch_size(source)
        if plan.frozen_levels is not None or plan.norm_eval:
            model.freeze(plan.frozen_levels, norm_eval=plan.norm_eval)
        return model

    def _classifier_model(self, plan: BuildPlan) -> ClassifierModel | None:
        """timm's classifier interface over the library model, where its head is known
        (docs/training.md, "Classifier models"); None: the library's own model."""
        self._refuse_instance_kwargs(plan)
        self.check_kwargs(plan)
        recipe = self.head_recipe(plan, self.source_on_meta(plan))
        check_head_options(recipe, plan.num_classes, plan.global_pool, context=plan.label)
        if recipe is None:
            return None
        features_plan = plan.model_copy(update={"features_only": True})
        layout = self.layout(features_plan) if plan.output_stride is not None else None
        # timm builds the head for num_classes first, then loads the checkpoint: a
        # fine-tuned checkpoint with another class count loads. So does unifeat.
        checkpoint = plan.checkpoint_path
        source, _ = self._real_source(plan.model_copy(update={"checkpoint_path": None}), layout)
        if layout is not None:
            layout.apply_dilation(source)
        if source is plan.module or (checkpoint is not None and plan.module is not None):
            # reset_classifier (and a checkpoint) must not reach the module passed in
            source = copy.deepcopy(source) if checkpoint else share_parameters_copy(source)
        inner = BuildPlan(
            backend=self.name,
            module=source,  # the feature model shares it, as for any module passed in
            features_only=True,
            out_indices=(-1,),
            input_size=plan.input_size,
            tracer_kwargs=plan.tracer_kwargs,
        )
        features = cast(FeatureModel, self._build(inner, keep_final=True))
        features._context = plan.label
        model = ClassifierModel(source, features, recipe, backend=self.name, context=plan.label)
        classes = model.num_classes if plan.num_classes is None else plan.num_classes
        pool = model.global_pool if plan.global_pool is None else plan.global_pool
        if classes != model.num_classes or model._hidden_size(pool) != model.head_hidden_size:
            model.reset_classifier(classes, pool)  # the old classifier does not fit
        else:
            model.global_pool = pool
        if checkpoint is not None:
            load_checkpoint(model.library_model, checkpoint, context=plan.label)
        return model

    def _real_source(
        self, plan: BuildPlan, layout: Layout | None
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The model to cut: a module passed in is shared (its parameters, never its
        structure) or, to load a checkpoint, copied; a name is built for real. Also
        the checkpoint's keys of a pyramid's layers (see :meth:`_load_checkpoint`)."""
        dilates = layout is not None and bool(layout.dilation)
        aside: dict[str, Any] = {}
        if plan.module is not None:
            if plan.device is not None or plan.dtype is not None:
                raise UnsupportedOptionError(
                    f"device= and dtype= choose where a model built by name lives; "
                    f"{plan.label} is already built: move it first (module.to(device, dtype))"
                )
            source = self.as_source(plan.module)
            if plan.checkpoint_path is not None:
                # Loading writes into the tensors, which the caller's module owns.
                source = copy.deepcopy(source)
                aside = self._load_checkpoint(plan, layout, source)
            elif plan.features_only and layout is not None:
                source = layout.copy_to_hold(source)
            elif dilates:
                source = share_parameters_copy(source)
            return source, aside
        extra = layout.build_kwargs if layout is not None else {}
        device = torch.device(plan.device) if plan.device is not None else None
        with fetching_weights(plan), built_with_kwargs(plan):
            if device is not None and not plan.pretrained:
                # Random weights are made where they will live: no CPU copy first.
                with device:
                    source = self.build(plan, meta=False, extra_kwargs=extra)
            else:
                source = self.build(plan, meta=False, extra_kwargs=extra)
        if plan.checkpoint_path is not None:
            aside = self._load_checkpoint(plan, layout, source)
        if device is not None or plan.dtype is not None:
            source = source.to(device=device, dtype=plan.dtype)
        return source, aside


def _with_input_size(native: tuple[int, int, int], plan: BuildPlan) -> tuple[int, int, int]:
    """``input_size=`` over the model's own: ``(H, W)`` keeps its channels."""
    if plan.input_size is None:
        return native
    if len(plan.input_size) == 3:
        return plan.input_size
    return native[0], plan.input_size[0], plan.input_size[1]
