"""Loading a local state dict (``checkpoint_path=``), the same for every backend."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unifeat._errors import CheckpointError

# Training scripts nest the weights under one of these keys.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Wrappers that prefix every key: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


_VALID = (
    "a checkpoint is a state dict written by torch.save(model.state_dict(), path) or "
    "safetensors.torch.save_file"
)


def _is_safetensors(path: Path) -> bool:
    """By content, not name: an 8-byte header length, then a JSON header."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < length < path.stat().st_size


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``.safetensors``, ``.pt``/``.pth``/``.bin`` files into a flat state dict.

    Weights nested under ``"state_dict"``/``"model"`` (as training scripts save
    them) and ``module.``/``_orig_mod.`` key prefixes are unwrapped.
    """
    path = Path(path)
    shown = repr(str(path))
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {shown} is a directory, not a file: name the weights file in it "
            "(a transformers model directory is a model name: 'hf:<directory>')"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {shown} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {shown} is empty: {_VALID}")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        if "Unsupported global" in str(exc) and "Module" in str(exc):
            raise CheckpointError(
                f"checkpoint {shown} holds a pickled model, not a state dict, and unifeat "
                "never unpickles code: save module.state_dict() instead"
            ) from None
        raise CheckpointError(
            f"could not read checkpoint {shown} as a state dict ({type(exc).__name__}: "
            f"{reason[:200]}): {_VALID}"
        ) from None
    while isinstance(loaded, Mapping):
        nested = next((k for k in _NESTING_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if nested is None:
            break
        loaded = loaded[nested]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    state = dict(loaded)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _check_fits(
    state: Mapping[str, Any],
    model: nn.Module,
    path: str | Path,
    context: str,
    optional: Collection[str] = (),
) -> None:
    own = model.state_dict()
    missing = [key for key in own if key not in state and key not in optional]
    unexpected = [key for key in state if key not in own]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {what}: {shown}")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {context}: {'; '.join(parts)}"
        )


def _split(state: dict[str, Any], set_aside: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if set_aside is None:
        return state, {}
    prefix = f"{set_aside}."
    aside = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return {key: value for key, value in state.items() if not key.startswith(prefix)}, aside


def check_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    context: str,
    optional: Collection[str] = (),
    set_aside: str | None = None,
) -> dict[str, Any]:
    """Raise the :class:`CheckpointError` :func:`load_checkpoint` would, without loading
    (``model`` may live on the meta device); returns what it sets aside."""
    state, aside = _split(read_state_dict(path), set_aside)
    _check_fits(state, model, path, context, optional)
    return aside


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    context: str,
    optional: Collection[str] = (),
    set_aside: str | None = None,
) -> dict[str, Any]:
    """Load ``path`` into ``model`` strictly, with a message that names what did not fit.

    ``optional``: keys that may be missing, because what holds them is cut away
    afterwards (a feature model's own state dict lacks the modules after its
    deepest level); those keep their initial values until they are dropped.
    ``set_aside``: a prefix of keys that belong to layers unifeat adds (a
    pyramid's): not loaded, returned without the prefix for :func:`load_part`.
    """
    state, aside = _split(read_state_dict(path), set_aside)
    _check_fits(state, model, path, context, optional)
    model.load_state_dict(state, strict=not any(key not in state for key in optional))
    return aside


def _part(module: nn.Module, state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    held = {name for name, _ in module.named_children()}
    kept = {key: value for key, value in state.items() if key.split(".", 1)[0] in held}
    return kept, [key for key in module.state_dict() if key not in kept]


def check_part(
    module: nn.Module, state: Mapping[str, Any], path: str | Path, *, context: str
) -> None:
    """Raise the :class:`CheckpointError` :func:`load_part` would, without loading."""
    kept, missing = _part(module, state)
    _check_fits(kept, module, path, context, optional=missing)


def load_part(
    module: nn.Module, state: Mapping[str, Any], path: str | Path, *, context: str
) -> None:
    """Load the keys a checkpoint has for ``module`` (layers unifeat adds), checked
    like :func:`load_checkpoint`: a key of a submodule ``module`` does not hold
    (a pruned pyramid level) is ignored, a missing key keeps its initial value (a
    backbone's checkpoint has none), a wrong shape is refused."""
    kept, missing = _part(module, state)
    _check_fits(kept, module, path, context, optional=missing)
    module.load_state_dict(kept, strict=False)
