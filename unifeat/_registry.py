"""The backend registry: names, aliases and lazily imported adapters.

Each backend is a line of data: its name, the adapter class (as an import
path, so nothing is imported until the backend is used), the library it needs
and the pip extra that installs it. Third-party packages add theirs with
:func:`register_backend` or an entry point in the ``unifeat.backends`` group,
read the first time a backend is looked up. ``import unifeat`` imports no
backend library.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from unifeat._errors import (
    BackendUnavailableError,
    UnknownBackendError,
    UnknownModelError,
    UnsupportedOptionError,
    close_matches,
    format_choices,
)

if TYPE_CHECKING:
    from torch import nn

    from unifeat._backends._base import Adapter

ENTRY_POINT_GROUP = "unifeat.backends"


@dataclass(frozen=True)
class BackendEntry:
    name: str
    adapter: str | Callable[[], Any]
    """``"package.module:ClassName"`` (imported on first use) or the adapter class."""
    requires: str | None
    """The top-level package of the library the backend wraps (None: nothing)."""
    extra: str | None
    """The pip extra (or package) that installs ``requires``."""
    aliases: tuple[str, ...] = ()
    claims_package: str | None = None
    """Module instances whose class comes from this package go to this backend."""


_ENTRIES: dict[str, BackendEntry] = {}
_ALIASES: dict[str, str] = {}
_ADAPTERS: dict[str, Adapter] = {}
_entry_points_read = False


def _add(entry: BackendEntry, *, replace: bool) -> None:
    for alias in (entry.name, *entry.aliases):
        owner = _ALIASES.get(alias)
        if owner is not None and owner != entry.name and not replace:
            raise UnsupportedOptionError(
                f"backend name {alias!r} is taken by backend {owner!r}: pick another name, or "
                "pass replace=True to take it over"
            )
    if entry.name in _ENTRIES and not replace:
        raise UnsupportedOptionError(
            f"a backend {entry.name!r} is registered already: pick another name, or pass "
            "replace=True to replace it"
        )
    if entry.name in _ENTRIES:
        old = _ENTRIES[entry.name]
        for alias in old.aliases:
            _ALIASES.pop(alias, None)
    _ENTRIES[entry.name] = entry
    _ADAPTERS.pop(entry.name, None)
    for alias in (entry.name, *entry.aliases):
        _ALIASES[alias] = entry.name


def register_backend(
    name: str,
    adapter: str | Callable[[], Any],
    *,
    requires: str | None = None,
    extra: str | None = None,
    aliases: Sequence[str] = (),
    claims_package: str | None = None,
    replace: bool = False,
) -> None:
    """Add a backend, so that ``create_model("<name>:<model>")`` and friends reach it.

    Args:
        name: the prefix users write (``"mylib"`` for ``"mylib:net"``).
        adapter: the adapter class, or ``"package.module:ClassName"`` to import it
            only when the backend is first used. An adapter subclasses
            :class:`unifeat.backends.Adapter` and describes its zoo; the docs
            page "Writing a backend" walks through one.
        requires: the top-level package the backend needs; where it is not
            installed, using the backend raises :class:`BackendUnavailableError`.
        extra: what to ``pip install`` for ``requires`` (named in that error).
        aliases: other prefixes for the same backend.
        claims_package: module instances whose class comes from this package are
            built by this backend.
        replace: replace a backend registered under ``name`` (or an alias) instead of
            refusing it.

    Bare model names are looked up in registration order: built-in backends
    first, then entry points, then backends registered at run time.

    Raises:
        UnsupportedOptionError: the name or an alias is taken (and ``replace`` is False).

    Examples:
        >>> import torch.nn as nn, unifeat
        >>> from unifeat.backends import Adapter
        >>> class TinyZoo(Adapter):
        ...     name = "tiny"
        ...     def has_model(self, name): return name == "net"
        ...     def model_names(self): return ["net"]
        ...     def build(self, plan, *, meta, extra_kwargs=None):
        ...         return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1))
        >>> unifeat.register_backend("tiny", TinyZoo)
        >>> unifeat.feature_info("tiny:net").channels()
        [8, 16]
        >>> unifeat.register_backend("tiny", TinyZoo)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unifeat._errors.UnsupportedOptionError: a backend 'tiny' is registered already: ...
    """
    if not isinstance(name, str) or not name or ":" in name or "/" in name:
        raise UnsupportedOptionError(
            f"invalid backend name {name!r}: expected a non-empty string without ':' or '/'"
        )
    if not (isinstance(adapter, str) and ":" in adapter) and not callable(adapter):
        raise UnsupportedOptionError(
            f"invalid adapter {adapter!r} for backend {name!r}: expected an Adapter subclass "
            "or 'package.module:ClassName'"
        )
    _read_entry_points()
    _add(
        BackendEntry(
            name=name,
            adapter=adapter,
            requires=requires,
            extra=extra,
            aliases=tuple(aliases),
            claims_package=claims_package,
        ),
        replace=replace,
    )


def _read_entry_points() -> None:
    """Register the backends that installed packages declare (once, lazily)."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _ALIASES:
            continue  # a built-in or an earlier package keeps its name
        _add(
            BackendEntry(
                name=point.name,
                adapter=point.value,
                requires=point.value.partition(":")[0].split(".")[0],
                extra=getattr(getattr(point, "dist", None), "name", None),
            ),
            replace=False,
        )


for _builtin in (
    BackendEntry("timm", "unifeat._backends.timm:TimmAdapter", "timm", "timm", (), "timm"),
    BackendEntry(
        "torchvision",
        "unifeat._backends.torchvision:TorchvisionAdapter",
        "torchvision",
        "torchvision",
        ("tv",),
        "torchvision",
    ),
    BackendEntry(
        "hf",
        "unifeat._backends.hf:HfAdapter",
        "transformers",
        "hf",
        ("transformers", "huggingface"),
        "transformers",
    ),
    BackendEntry(
        "open_clip",
        "unifeat._backends.open_clip:OpenClipAdapter",
        "open_clip",
        "openclip",
        ("oc", "openclip"),
        "open_clip",
    ),
    # Any other module: traced with FX. It claims no names, only module instances.
    BackendEntry("fx", "unifeat._backends.fx:FxAdapter", "torchvision", "torchvision"),
):
    _add(_builtin, replace=False)
_FALLBACK_FOR_MODULES = "fx"


def backend_names() -> tuple[str, ...]:
    """Registered backends, in the order bare model names are looked up."""
    _read_entry_points()
    return tuple(_ENTRIES)


def canonical_backend(name: str, *, context: str = "") -> str:
    """The registered name for ``name`` or one of its aliases."""
    _read_entry_points()
    try:
        return _ALIASES[name]
    except (KeyError, TypeError):
        where = f" (for {context})" if context else ""
        raise UnknownBackendError(
            f"unknown backend {name!r}{where}: known backends are {format_choices(backend_names())}"
        ) from None


def is_available(name: str) -> bool:
    requires = _ENTRIES[name].requires
    return requires is None or importlib.util.find_spec(requires) is not None


def get_adapter(name: str) -> Adapter:
    """The adapter of backend ``name``, imported on first use."""
    name = canonical_backend(name)
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    entry = _ENTRIES[name]
    hint = (
        f'install it with `pip install "unifeat[{entry.extra}]"`'
        if entry.extra and entry.name in _BUILTIN_EXTRAS
        else f"install it with `pip install {entry.extra or entry.requires}`"
    )
    if not is_available(name):
        raise BackendUnavailableError(
            f"the {name!r} backend needs the {entry.requires!r} package, which is not "
            f"installed: {hint}"
        )
    factory = entry.adapter
    if isinstance(factory, str):
        module_name, _, class_name = factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the {name!r} backend could not import {entry.requires!r} ({exc}): {hint}"
            ) from exc
        factory = getattr(module, class_name)
    adapter = factory()
    _ADAPTERS[name] = adapter
    return adapter


_BUILTIN_EXTRAS = frozenset({"timm", "torchvision", "hf", "open_clip", "fx"})


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
