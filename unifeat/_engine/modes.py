"""Whether a traced forward read a module's ``training`` flag.

A traced graph bakes in the branches its code took: ``if self.training: ...``,
``F.dropout(x, p, training=self.training)``. Code that never reads the flag
traces to the same graph in either mode (leaf modules, a ``BatchNorm`` or a
``Dropout``, are not traced into: they read their own flag when the graph
runs). So where the eval-mode trace read no flag, the train graph is that same
graph and is never traced: a feature model built from a model in training
mode costs one trace, and ``.train()`` on one built in eval mode costs none
(torchvision's ``create_feature_extractor`` always traces both).

While a trace runs, :func:`watching_mode_reads` makes ``nn.Module.training`` a
data descriptor that reads and writes each module's own flag exactly as the
plain attribute does, and notes whether code on the tracing thread read one.
Where that cannot be told, it answers "read", and both graphs are traced as
before: a class of the traced model defines ``training`` itself (the
descriptor would not see it), or overrides ``train``/``eval`` (its own notion
of a mode may set other attributes the forward reads).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["ModeReads", "watching_mode_reads"]


class ModeReads:
    """What a watched trace did: ``read`` is True where its code read a ``training``
    flag, or where that could not be told."""

    def __init__(self, read: bool = False) -> None:
        self.read = read


class _WatchedFlag:
    """``nn.Module.training`` during a watched trace: each module's own flag, read
    and written as ever; reads on the tracing thread are noted."""

    def __init__(self, reads: ModeReads) -> None:
        self.reads = reads
        self.thread = threading.get_ident()

    def __get__(self, module: Any, owner: Any = None) -> bool:
        if module is None:
            raise AttributeError("training")  # as on the class without the watch
        try:
            value: bool = module.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None
        if threading.get_ident() == self.thread:
            self.reads.read = True
        return value

    def __set__(self, module: Any, value: bool) -> None:
        module.__dict__["training"] = value


def _observable(cls: type) -> bool:
    """Whether reads of ``training`` on modules of ``cls`` go through ``nn.Module``
    and its mode is nothing but the flags (no ``train``/``eval`` of its own)."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            continue
        own = vars(klass)
        if "training" in own or "train" in own or "eval" in own:
            return False
    return True


@contextmanager
def watching_mode_reads(root: nn.Module) -> Iterator[ModeReads]:
    """Note whether code run on this thread inside the block reads any module's
    ``training`` flag (see the module docstring). Callers hold the trace lock:
    one watch at a time; other threads read and write flags unchanged meanwhile."""
    classes = {type(module) for module in root.modules()}
    if "training" in vars(nn.Module) or not all(_observable(cls) for cls in classes):
        yield ModeReads(read=True)
        return
    reads = ModeReads()
    # nn.Module declares ``training`` only as an annotation: the class attribute set
    # here is the only one, and deleting it restores the plain instance attribute.
    nn.Module.training = _WatchedFlag(reads)  # type: ignore[assignment]
    try:
        yield reads
    finally:
        del nn.Module.training
