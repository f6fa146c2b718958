"""The backend registry: names, aliases and lazily imported adapters.

Each backend is a line of data: its name, the adapter class as an import path,
the library it needs and the pip extra that installs it. Nothing here imports
a backend library; an adapter module is imported the first time the backend is
used, so ``import unifeat`` stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from unifeat._errors import (
    BackendUnavailableError,
    UnknownBackendError,
    UnknownModelError,
    close_matches,
    format_choices,
)

if TYPE_CHECKING:
    from torch import nn

    from unifeat._backends._base import Adapter


@dataclass(frozen=True)
class BackendEntry:
    name: str
    adapter: str
    """``"package.module:ClassName"`` of the adapter, imported on first use."""
    requires: str
    """The top-level package of the library the backend wraps."""
    extra: str
    """The pip extra that installs ``requires``."""
    aliases: tuple[str, ...] = ()
    claims_package: str | None = None
    """Module instances whose class comes from this package go to this backend."""


_ENTRIES: dict[str, BackendEntry] = {}
_ALIASES: dict[str, str] = {}
_ADAPTERS: dict[str, Adapter] = {}


def register_backend(entry: BackendEntry) -> None:
    """Add a backend. Registration order is the lookup order for bare names."""
    _ENTRIES[entry.name] = entry
    for alias in (entry.name, *entry.aliases):
        _ALIASES[alias] = entry.name


register_backend(
    BackendEntry(
        name="timm",
        adapter="unifeat._backends.timm:TimmAdapter",
        requires="timm",
        extra="timm",
        claims_package="timm",
    )
)


register_backend(
    BackendEntry(
        name="torchvision",
        adapter="unifeat._backends.torchvision:TorchvisionAdapter",
        requires="torchvision",
        extra="torchvision",
        aliases=("tv",),
        claims_package="torchvision",
    )
)
register_backend(
    BackendEntry(
        name="hf",
        adapter="unifeat._backends.hf:HfAdapter",
        requires="transformers",
        extra="hf",
        aliases=("transformers", "huggingface"),
        claims_package="transformers",
    )
)
# Any other module: traced with FX. It claims no names, only module instances.
register_backend(
    BackendEntry(
        name="fx",
        adapter="unifeat._backends.fx:FxAdapter",
        requires="torchvision",
        extra="torchvision",
    )
)
_FALLBACK_FOR_MODULES = "fx"


def backend_names() -> tuple[str, ...]:
    """Registered backends, in the order bare model names are looked up."""
    return tuple(_ENTRIES)


def canonical_backend(name: str, *, context: str = "") -> str:
    """The registered name for ``name`` or one of its aliases."""
    try:
        return _ALIASES[name]
    except KeyError:
        where = f" (for {context})" if context else ""
        raise UnknownBackendError(
            f"unknown backend {name!r}{where}: known backends are {format_choices(backend_names())}"
        ) from None


def is_available(name: str) -> bool:
    return importlib.util.find_spec(_ENTRIES[name].requires) is not None


def get_adapter(name: str) -> Adapter:
    """The adapter of backend ``name``, imported on first use."""
    name = canonical_backend(name)
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    entry = _ENTRIES[name]
    hint = f'install it with `pip install "unifeat[{entry.extra}]"`'
    if not is_available(name):
        raise BackendUnavailableError(
            f"the {name!r} backend needs the {entry.requires!r} package, which is not "
            f"installed: {hint}"
        )
    module_name, _, class_name = entry.adapter.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the {name!r} backend could not import {entry.requires!r} ({exc}): {hint}"
        ) from exc
    adapter: Adapter = getattr(module, class_name)()
    _ADAPTERS[name] = adapter
    return adapter


def split_backend_prefix(model_name: str) -> tuple[str | None, str]:
    """``"tv:resnet50"`` -> ``("tv", "resnet50")``; ``"resnet50"`` -> ``(None, ...)``.

    A prefix is the text before the first colon when it has no slash (so a
    Windows drive or URL is not mistaken for one). timm's own ``hf-hub:`` and
    ``local-dir:`` schemes are names, not prefixes.
    """
    head, sep, rest = model_name.partition(":")
    if not sep or "/" in head or head in {"hf-hub", "local-dir"}:
        return None, model_name
    return head, rest


def resolve_model_name(model_name: str, backend: str | None) -> tuple[str, str]:
    """Pick the backend for a model name: ``(backend, name_without_prefix)``."""
    prefix, bare = split_backend_prefix(model_name)
    if prefix is not None:
        prefixed = canonical_backend(prefix, context=f"model {model_name!r}")
        if backend is not None and canonical_backend(backend) != prefixed:
            raise UnknownBackendError(
                f"model {model_name!r} names backend {prefixed!r} but backend={backend!r} "
                "was passed too: drop one of them"
            )
        backend = prefixed
    if backend is not None:
        name = canonical_backend(backend, context=f"model {model_name!r}")
        adapter = get_adapter(name)
        if not adapter.has_model(bare):
            _raise_unknown_model(bare, [name])
        return name, bare
    searched = [name for name in backend_names() if is_available(name)]
    for name in searched:
        if get_adapter(name).has_model(bare):
            return name, bare
    _raise_unknown_model(bare, searched)


def _raise_unknown_model(name: str, searched: list[str]) -> NoReturn:
    scored: list[tuple[float, str]] = []
    for backend in searched:
        for match in close_matches(name, get_adapter(backend).model_names()):
            ratio = difflib.SequenceMatcher(None, name.lower(), match.lower()).ratio()
            scored.append((ratio, f"{backend}:{match}"))
    suggestions = [qualified for _, qualified in sorted(scored, key=lambda s: -s[0])[:5]]
    hint = f"; close matches: {', '.join(suggestions)}" if suggestions else ""
    raise UnknownModelError(
        f"unknown model {name!r}: no {format_choices(searched)} model has that name{hint}"
    )


def backend_for_module(module: nn.Module) -> str:
    """The backend that claims a module instance, from its class's package."""
    packages = {cls.__module__.partition(".")[0] for cls in type(module).__mro__}
    for entry in _ENTRIES.values():
        if entry.claims_package in packages:
            return entry.name
    return _FALLBACK_FOR_MODULES
