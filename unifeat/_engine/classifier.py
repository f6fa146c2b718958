"""timm's classifier interface over any backend's model, written once.

:class:`ClassifierModel` is what :func:`unifeat.create_model` returns with
``features_only=False`` and ``num_classes=``/``global_pool=`` for a
torchvision, transformers, open_clip or other (FX-traced) model whose head
unifeat knows (:data:`KNOWN_HEADS`). ``forward_features`` is the one :class:`FeatureModel`'s final
output (what timm's ``forward_features`` gives for the same architecture);
``forward_head`` is a pooling step, the source's own pre-logits modules and
its own classifier, all found by path in the library model from a
:class:`HeadRecipe` the adapter supplies as data. Parameters are the library
model's (shared), and state-dict keys are its keys; see the docs page
"Training and deployment".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unifeat._engine.meta import meta_batch, weightless
from unifeat._engine.model import (
    AdoptingModule,
    FeatureModel,
    _load_from_source_keys,
    adopt,
    root_of,
)
from unifeat._errors import UnsupportedOptionError, format_choices

HeadLayout = Literal["map", "tokens"]

_POOLS: dict[str, tuple[str, ...]] = {"map": ("avg", "max", ""), "tokens": ("token", "avg", "")}
FLATTEN = "flatten"
"""A pre-logits step that is ``torch.flatten(x, 1)`` rather than a module path."""
NHWC_TO_NCHW = "<permute NHWC to NCHW>"
"""A pre-pool step that is ``x.permute(0, 3, 1, 2)`` (torchvision Swin's head)."""
TOKEN_AVG = "token_avg"
"""The pool of transformers' DINOv2 classifiers: ``concat(class token, mean of the
patch tokens)`` (register tokens left out), twice ``num_features`` wide."""
_POOL_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "adaptive_avg_pool2d": lambda x: F.adaptive_avg_pool2d(x, 1),
    "adaptive_max_pool2d": lambda x: F.adaptive_max_pool2d(x, 1),
}
"""Functional pools a model calls instead of a module (``pool_function``)."""


@dataclass(frozen=True)
class HeadRecipe:
    """Where a library model's head is, as module paths in the model (zoo data).

    The head runs on ``forward_features``' output: the ``pre_pool`` steps, the
    pool (``pool_module``, the library's own pooling module, or ``pool_function``,
    for the default pool; on tokens a 1-D pool module such as transformers Swin's
    ``AdaptiveAvgPool1d``, applied to ``[N, C, L]``), the ``pre_logits`` steps
    (module paths, or :data:`FLATTEN`), the ``drop`` modules (dropout before the
    classifier), then the ``classifier``: a module path, or the path of an
    ``nn.Parameter`` applied as ``x @ p`` (open_clip's ``proj``), which
    ``reset_classifier`` replaces by an ``nn.Linear``.
    """

    layout: HeadLayout
    classifier: str
    """Path of the classifier; a model without one gets it there on ``reset_classifier``."""
    num_features: int
    """Channels of ``forward_features``' output."""
    head_hidden_size: int
    """Width of the pre-logits features (the classifier's input)."""
    num_classes: int = 0
    """Classes of the library model's own classifier (0: it has none)."""
    default_pool: str = "avg"
    pool_module: str | None = None
    pool_function: str | None = None
    """A functional pool of ``_POOL_FUNCTIONS`` the model calls for its default pool."""
    pools: tuple[str, ...] | None = None
    """The valid ``global_pool`` values, where they are not the layout's."""
    pre_pool: tuple[str, ...] = ()
    pre_logits: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    num_prefix_tokens: int = 1


KNOWN_HEADS = (
    "torchvision ResNet, ResNeXt, Wide ResNet, RegNet, ConvNeXt, VisionTransformer, "
    "SwinTransformer, DenseNet, EfficientNet, MobileNetV2/V3; transformers resnet, "
    "regnet, bit, convnext, convnextv2, vit, deit, beit, data2vec-vision, dinov2, "
    "dinov2_with_registers, swin, swinv2 (base models and *ForImageClassification); "
    "open_clip ViT towers; modules whose graph ends in global pooling and one "
    "nn.Linear; timm"
)
"""The models whose head unifeat knows (docs/training.md, "Classifier models")."""


def pools_of(recipe: HeadRecipe) -> tuple[str, ...]:
    """The ``global_pool`` values a head takes."""
    return recipe.pools if recipe.pools is not None else _POOLS[recipe.layout]


def check_head_options(
    recipe: HeadRecipe | None, num_classes: int | None, global_pool: str | None, *, context: str
) -> None:
    """Refuse, before anything is built, head options the model cannot honour."""
    if recipe is None:
        if num_classes is not None or global_pool is not None:
            given = "num_classes=" if num_classes is not None else "global_pool="
            raise UnsupportedOptionError(
                f"{given} needs a classifier head unifeat knows, but it does not know the head "
                f"of {context}; known: {KNOWN_HEADS}; features_only=True gives this "
                "model's features"
            )
        return
    valid = pools_of(recipe)
    if global_pool is not None and global_pool not in valid:
        raise UnsupportedOptionError(
            f"invalid global_pool={global_pool!r} for {context}: expected "
            f"{format_choices(valid)} ('' gives unpooled features, with num_classes=0)"
        )
    classes = recipe.num_classes if num_classes is None else num_classes
    if global_pool == "" and classes:
        raise UnsupportedOptionError(
            f"global_pool='' gives unpooled features, so {context} takes it with "
            f"num_classes=0 only (its classifier has {classes} classes)"
        )


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    owner._parameters.pop(name, None)  # a projection parameter becomes a module
    setattr(owner, name, module)


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _reshare(copy: nn.Module, source: nn.Module) -> None:
    """Point the copy's parameters and buffers back at the source's own tensors
    (``.to()`` replaces buffers module by module)."""
    for path, module in copy.named_modules(remove_duplicate=False):
        try:
            own = source.get_submodule(path) if path else source
        except AttributeError:
            continue
        if own is module:
            continue
        for store in ("_parameters", "_buffers"):
            theirs, ours = getattr(own, store), getattr(module, store)
            for name in list(ours):
                found = theirs.get(name)
                if found is not None and ours[name] is not None:
                    ours[name] = found


class ClassifierModel(AdoptingModule):
    """A library model with timm's classifier interface, sharing its parameters.

    ``forward(x)`` = ``forward_head(forward_features(x))``: the library model's
    logits while its head is its own; pooled pre-logits features with
    ``num_classes=0``, unpooled ones with ``global_pool=""`` too.

    Its parameters, buffers and submodules are the library model's, under the
    library's own names (``model.fc``, ``state_dict()`` keys), as in timm.

    Attributes:
        library_model: the library's own model (its head as :meth:`reset_classifier`
            left it).
        num_classes: classes of the classifier (0: none).
        num_features: channels of ``forward_features``' output.
        head_hidden_size: width of the pre-logits features.
        global_pool: the pooling of ``forward_head`` (``""``: none).
        backend: the backend that built the model.

    Examples:
        >>> import torch, unifeat
        >>> model = unifeat.create_model("tv:resnet18", num_classes=10).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> tuple(model(x).shape), tuple(model.forward_features(x).shape)
        ((1, 10), (1, 512, 2, 2))
        >>> tuple(model.forward_head(model.forward_features(x), pre_logits=True).shape)
        (1, 512)
    """

    own_settings = frozenset(
        {"backend", "num_features", "head_hidden_size", "global_pool", "num_classes"}
    )
    backend: str

    def __init__(
        self,
        model: nn.Module,
        features: FeatureModel,
        recipe: HeadRecipe,
        *,
        backend: str,
        context: str,
    ) -> None:
        super().__init__()
        adopt(self, model)
        # Not registered: it runs the model's own tensors, which state_dict, .to()
        # and optimizers reach through this model.
        self.__dict__["_features"] = features
        self.training = model.training
        self.backend = backend
        self._recipe = recipe
        self._context = context
        self.num_features = recipe.num_features
        self.head_hidden_size = recipe.head_hidden_size
        self.global_pool = recipe.default_pool
        head = self._head()
        self.num_classes = (
            int(head.shape[-1]) if isinstance(head, Tensor) else self._classes_of(head or _NONE)
        )
        self.register_load_state_dict_pre_hook(_load_from_source_keys)

    @property
    def library_model(self) -> nn.Module:
        """The library's own model, whose parameters, buffers and submodules this one
        holds under the same names (its head as :meth:`reset_classifier` left it)."""
        return root_of(self)

    # -- the head ------------------------------------------------------------------------

    @staticmethod
    def _classes_of(classifier: nn.Module) -> int:
        out = getattr(classifier, "out_features", None)
        return int(out) if isinstance(out, int) else 0

    def _head(self) -> nn.Module | Tensor | None:
        """What is at the classifier's path: a module, a projection parameter, or None."""
        parent, _, name = self._recipe.classifier.rpartition(".")
        if parent and not _has_submodule(self.library_model, parent):
            return None
        owner = self.library_model.get_submodule(parent) if parent else self.library_model
        found = getattr(owner, name, None)
        return found if isinstance(found, (nn.Module, Tensor)) else None

    def get_classifier(self) -> nn.Module:
        """The classifier module (``nn.Identity`` where there is none). A projection
        parameter (open_clip's ``proj``) comes back as a module holding that same
        parameter as its ``weight`` (``x @ weight``), for optimizer groups."""
        head = self._head()
        if isinstance(head, Tensor):
            return _Projection(head)
        return head if head is not None else nn.Identity()

    def _hidden_size(self, pool: str) -> int:
        """The classifier's input width under ``pool``."""
        if pool == TOKEN_AVG:
            return 2 * self.num_features
        if self._recipe.default_pool == TOKEN_AVG:
            return self.num_features
        return self._recipe.head_hidden_size

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none, ``forward`` gives pre-logits
        features), and optionally another pooling, as timm's method does."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise UnsupportedOptionError(
                f"invalid num_classes={num_classes!r} for {self._context}: expected an int >= 0 "
                "(0: no classifier)"
            )
        if global_pool is not None and not isinstance(global_pool, str):
            raise UnsupportedOptionError(
                f"invalid global_pool={global_pool!r} for {self._context}: expected a string"
            )
        pool = self.global_pool if global_pool is None else global_pool
        check_head_options(self._recipe, num_classes, pool, context=self._context)
        reference = next(self.library_model.parameters(), None)
        self.head_hidden_size = self._hidden_size(pool)
        classifier: nn.Module = (
            nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        )
        if reference is not None:
            classifier = classifier.to(device=reference.device, dtype=reference.dtype)
        _set_submodule(self.library_model, self._recipe.classifier, classifier)
        self.global_pool = pool
        self.num_classes = num_classes
        self.__dict__.pop("_unused_by_forward", None)

    def _pool(self, x: Tensor) -> Tensor:
        recipe = self._recipe
        x = self._steps(x, recipe.pre_pool)
        default = self.global_pool == recipe.default_pool
        if recipe.layout == "tokens":
            prefix = recipe.num_prefix_tokens
            if self.global_pool == "token":
                return x[:, 0]
            if self.global_pool == TOKEN_AVG:
                return torch.cat([x[:, 0], x[:, prefix:].mean(dim=1)], dim=1)
            if self.global_pool == "max":
                return x[:, prefix:].amax(dim=1)
            if default and recipe.pool_module is not None:
                pool = self.library_model.get_submodule(recipe.pool_module)
                return pool(x[:, prefix:].transpose(1, 2))
            return x[:, prefix:].mean(dim=1)
        if default and recipe.pool_module is not None:
            return self.library_model.get_submodule(recipe.pool_module)(x)
        if default and recipe.pool_function is not None:
            return _POOL_FUNCTIONS[recipe.pool_function](x)
        if self.global_pool == "max":
            return x.amax(dim=(2, 3), keepdim=True)
        return x.mean(dim=(2, 3), keepdim=True)

    def _steps(self, x: Tensor, paths: tuple[str, ...]) -> Tensor:
        for path in paths:
            if path == FLATTEN:
                x = x.flatten(1)
            elif path == NHWC_TO_NCHW:
                x = x.permute(0, 3, 1, 2)
            else:
                x = self.library_model.get_submodule(path)(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool ``forward_features``' output, then the pre-logits modules, then (unless
        ``pre_logits``) the classifier. With ``global_pool=''`` it returns ``x`` as is."""
        if self.global_pool == "":
            return x
        x = self._steps(self._pool(x), self._recipe.pre_logits)
        if x.dim() > 2:
            x = x.flatten(1)
        if pre_logits:
            return x
        x = self._steps(x, self._recipe.drop)
        head = self._head()
        if isinstance(head, Tensor):
            return x @ head
        return head(x) if head is not None else x

    # -- features ------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """The unpooled output of the last block after the final norm, in the model's
        native layout: what the feature model's ``forward_intermediates`` gives as
        its final output, and timm's ``forward_features`` for the same architecture."""
        features: FeatureModel = self.__dict__["_features"]
        final, _ = features.forward_intermediates(x, indices=(len(features.feature_info) - 1,))
        return final  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- nn.Module behaviour ------------------------------------------------------------

    def train(self, mode: bool = True) -> ClassifierModel:
        super().train(mode)
        features = self.__dict__.get("_features")
        if features is not None:
            features.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> ClassifierModel:
        super()._apply(fn, recurse)
        features = self.__dict__.get("_features")
        if features is not None:
            features._apply(fn, recurse)
            _reshare(root_of(features), self.library_model)
        return self

    # -- distributed training ---------------------------------------------------------------

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Parameters ``forward`` never uses (a transformers ViT's pooler, which the
        head does not read; the library model's classifier with ``num_classes=0``):
        DistributedDataParallel reads this name and leaves them out, so its default
        ``find_unused_parameters=False`` works. Found on the meta device, cached until
        ``reset_classifier``."""
        cached = self.__dict__.get("_unused_by_forward")
        if cached is None:
            cached = _unused_by_forward(self)
            self.__dict__["_unused_by_forward"] = cached
        return list(cached)

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` input the library model was made for."""
        return self.__dict__["_features"].input_size

    # -- timm's training tools ----------------------------------------------------------

    @property
    def classifier_path(self) -> str:
        """Where the classifier is, as a module path (timm's ``pretrained_cfg["classifier"]``)."""
        return self._recipe.classifier

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The preprocessing in timm's format, with ``num_classes`` and ``classifier``:
        what ``timm.data.resolve_model_data_config`` reads (see
        :attr:`FeatureModel.pretrained_cfg`)."""
        from unifeat._data import timm_pretrained_cfg

        return timm_pretrained_cfg(self)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """:attr:`pretrained_cfg`, under timm's older name."""
        return self.pretrained_cfg

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The feature model's groups (:meth:`FeatureModel.group_matcher`), from the stem
        to the final norm; the head is left to timm's top group."""
        features: FeatureModel = self.__dict__["_features"]
        return features.group_matcher(coarse=coarse)

    def no_weight_decay(self) -> set[str]:
        """:meth:`FeatureModel.no_weight_decay` of the library model."""
        own = getattr(self.library_model, "no_weight_decay", None)
        names = set(own()) if callable(own) else set()
        mine = {name for name, _ in self.named_parameters()}
        return {name for name in names if name in mine}

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, num_classes={self.num_classes}, "
            f"global_pool={self.global_pool!r}"
        )


_NONE = nn.Identity()


class _Projection(nn.Module):
    """A projection parameter (open_clip's ``proj``) seen as a classifier module:
    ``x @ weight``, its ``weight`` the model's own parameter."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


def _unused_by_forward(model: ClassifierModel) -> tuple[str, ...]:
    """Names of the trainable parameters that get no gradient from ``forward``.

    Found on the meta device with stand-ins for every tensor, on a replica (the
    feature model's copy of the structure, replicated alongside, reads the same
    stand-ins): nothing is computed, nothing of the model changes.
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return ()
    features: FeatureModel = model.__dict__["_features"]
    x = meta_batch(model, model.default_input_size)
    # The feature model runs its own copy of the structure on the same tensors:
    # replicated with one memo of modules and stand-ins, it reads the stand-ins of
    # those tensors, and the replica of the model calls it.
    memo: dict[int, nn.Module] = {}
    by_id: dict[int, Tensor] = {}
    try:
        probe = weightless(model, trainable=True, memo=memo, stand_ins_by_id=by_id)
        theirs = weightless(features, trainable=True, memo=memo, stand_ins_by_id=by_id)
        probe.module.__dict__["_features"] = theirs.module
        total = probe.module(x).float().sum()
        grads = torch.autograd.grad(
            total, [probe.stand_ins[name] for name in trainable], allow_unused=True
        )
    except Exception:
        return ()  # cannot tell: leave DDP's own checks in charge
    return tuple(name for name, grad in zip(trainable, grads, strict=True) if grad is None)
