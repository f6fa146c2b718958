"""Category (e): one feature model, many callers at once.

A model server calls one feature model from several threads; ``nn.DataParallel``
runs shallow replicas of it (``Module._replicate_for_data_parallel``: each
replica copies the module's ``__dict__``, so any per-call state kept on the
module, or any hook bound to the original, is shared) in threads too. Either
way each call must see its own input's features: equal to what sequential
calls give. The replicas are made by ``cpu_replicate`` below, torch's
``replicate`` without the device broadcast, so no GPU is needed.

Threads meet at a barrier before every call, so the calls really overlap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ._support import BACKENDS, Backend, eval_model, maps_of, param

THREADS = 4
ROUNDS = 6


def _params() -> list[Any]:
    return [param(b, id=b.id) for b in BACKENDS]


def _in_threads(calls: list[Callable[[], Any]], rounds: int = ROUNDS) -> list[list[Any]]:
    """Run ``calls[i]`` in thread ``i``, ``rounds`` times, all starting together.

    Returns each thread's results (an exception counts as a result, so a failing
    call never leaves the others waiting at the barrier).
    """
    barrier = threading.Barrier(len(calls))
    results: list[list[Any]] = [[] for _ in calls]

    def work(index: int) -> None:
        for _ in range(rounds):
            barrier.wait(timeout=60)
            try:
                results[index].append(calls[index]())
            except Exception as error:
                results[index].append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return results


def _same(found: Any, expected: list[torch.Tensor]) -> bool:
    if isinstance(found, Exception):
        return False
    return len(found) == len(expected) and all(
        torch.equal(a, b) for a, b in zip(found, expected, strict=True)
    )


def _check(results: list[list[Any]], expected: list[list[torch.Tensor]]) -> None:
    wrong = [
        (thread, found if isinstance(found, Exception) else "other maps")
        for thread, runs in enumerate(results)
        for found in runs
        if not _same(found, expected[thread])
    ]
    assert not wrong, f"{len(wrong)} of {sum(map(len, results))} calls went wrong: {wrong[:3]}"


def _inputs() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(2, 3, 32, 32) for _ in range(THREADS)]


@pytest.mark.parametrize("backend", _params())
def test_forward_from_threads_equals_sequential(backend: Backend) -> None:
    model = eval_model(backend)
    inputs = _inputs()

    def call(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return maps_of(model(x))

    expected = [call(x) for x in inputs]
    results = _in_threads([lambda x=x: call(x) for x in inputs])
    _check(results, expected)


@pytest.mark.parametrize("backend", _params())
def test_forward_intermediates_with_other_indices_from_threads(backend: Backend) -> None:
    """Each thread asks for other levels: per-call index state would mix them up."""
    model = eval_model(backend)
    levels = len(model.feature_info)
    wanted = [(0,), (levels - 1,), (0, levels - 1), tuple(range(levels))]
    inputs = _inputs()

    def call(x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        with torch.no_grad():
            return maps_of(model.forward_intermediates(x, indices, intermediates_only=True))

    expected = [call(x, i) for x, i in zip(inputs, wanted, strict=True)]
    results = _in_threads(
        [lambda x=x, i=i: call(x, i) for x, i in zip(inputs, wanted, strict=True)]
    )
    _check(results, expected)


def cpu_replicate(network: nn.Module, copies: int) -> list[nn.Module]:
    """``torch.nn.parallel.replicate`` on the CPU: shallow module replicas whose
    parameters and buffers are per-replica tensors (as after a broadcast)."""
    params = list(network.parameters())
    buffers = list(network.buffers())
    param_index = {p: i for i, p in enumerate(params)}
    buffer_index = {b: i for i, b in enumerate(buffers)}
    param_copies = [[p.detach().clone() for p in params] for _ in range(copies)]
    buffer_copies = [[b.detach().clone() for b in buffers] for _ in range(copies)]
    modules = list(network.modules())
    module_index = {m: i for i, m in enumerate(modules)}
    replicas: list[list[nn.Module]] = [[] for _ in range(copies)]
    for module in modules:
        for j in range(copies):
            replica = module._replicate_for_data_parallel()
            replica._former_parameters = OrderedDict()
            replicas[j].append(replica)
    for i, module in enumerate(modules):
        for j in range(copies):
            replica = replicas[j][i]
            for key, child in module._modules.items():
                if child is None:
                    replica._modules[key] = None
                else:
                    setattr(replica, key, replicas[j][module_index[child]])
            for key, tensor in module._parameters.items():
                if tensor is None:
                    replica._parameters[key] = None
                else:
                    setattr(replica, key, param_copies[j][param_index[tensor]])
            for key, tensor in module._buffers.items():
                if tensor is None:
                    replica._buffers[key] = None
                else:
                    setattr(replica, key, buffer_copies[j][buffer_index[tensor]])
    return [replicas[j][0] for j in range(copies)]


@pytest.mark.parametrize("backend", _params())
def test_data_parallel_replicas_one_after_another(backend: Backend) -> None:
    model = eval_model(backend)
    inputs = _inputs()[:2]
    with torch.no_grad():
        expected = [maps_of(model(x)) for x in inputs]
        for replica, x, maps in zip(cpu_replicate(model, 2), inputs, expected, strict=True):
            assert _same(maps_of(replica(x)), maps)


@pytest.mark.parametrize("backend", _params())
def test_data_parallel_replicas_in_threads(backend: Backend) -> None:
    model = eval_model(backend)
    inputs = _inputs()
    replicas = cpu_replicate(model, THREADS)

    def call(replica: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return maps_of(replica(x))

    expected = [call(model, x) for x in inputs]
    results = _in_threads(
        [lambda r=r, x=x: call(r, x) for r, x in zip(replicas, inputs, strict=True)], rounds=3
    )
    _check(results, expected)


@pytest.mark.parametrize(
    "backend", [b for b in BACKENDS if b.backend in ("timm", "hf")], ids=lambda b: b.id
)
def test_building_from_threads(backend: Backend) -> None:
    """feature_info and create_model called from several threads at once agree.

    The FX backends are checked in a subprocess (below): their failure can leave
    torch patched for the rest of the process.
    """
    expected = backend.info()
    calls: list[Callable[[], Any]] = [
        backend.info,
        lambda: backend.create().feature_info,
        backend.info,
        lambda: backend.create().feature_info,
    ]
    results = _in_threads(calls, rounds=2)
    for runs in results:
        assert all(found == expected for found in runs), runs


# torch.fx's tracer patches nn.Module.__call__/__getattr__ (and autowrapped
# functions) process-wide while it traces; two traces at once break each other
# and can leave the patch in place. So these run in a fresh interpreter, which
# reports every error and whether torch was left as it was.
#
# "mixed" is the stress case for one module passed in from many threads: builds,
# feature_info, get_node_names (a train-mode trace), freeze (meta probes) and the
# module's own forward at once. Each must give what it gives alone, and the
# module must never be seen changed: no meta stand-in in place of a weight, no
# mode switched, no hook left, no forward recorded into another thread's trace.
_FX_THREADS_SCRIPT = """
import json, threading
import torch
from torch import nn
import unifeat
from tests.adversarial._support import TinyNet

ORIGINAL = (nn.Module.__call__, nn.Module.__getattr__)


def in_threads(calls, rounds):
    for call in dict.fromkeys(calls):
        call()  # imports and adapters first: only the concurrency is under test
    barrier, errors = threading.Barrier(len(calls)), []

    def work(call):
        for _ in range(rounds):
            barrier.wait(timeout=120)
            try:
                call()
            except Exception as error:
                errors.append(f"{type(error).__name__}: {str(error)[:160]}")

    workers = [threading.Thread(target=work, args=(call,)) for call in calls]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
    intact = (nn.Module.__call__, nn.Module.__getattr__) == ORIGINAL
    nn.Module.__call__, nn.Module.__getattr__ = ORIGINAL  # repaired for the next check
    return {"errors": errors, "intact": intact}


def state(module):
    return (
        [(name, id(t), t.device.type, t.requires_grad) for name, t in module.named_parameters()],
        [(name, id(t), t.device.type) for name, t in module.named_buffers()],
        [(name, m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
         for name, m in module.named_modules()],
        sorted(vars(module)),
    )


def modes(module):
    return [(name, m.training) for name, m in module.named_modules()]


def mixed(threads=10, rounds=6):
    source = TinyNet().eval()
    x = torch.randn(2, 3, 64, 64)
    alone = unifeat.create_model(source, features_only=True)
    built = modes(alone)
    with torch.no_grad():
        maps = alone(x)
    info = unifeat.feature_info(source)
    names = unifeat.get_node_names(source)
    with torch.no_grad():
        output = source(x)
    held = alone.freeze(1)._held_in_eval
    alone.unfreeze()
    before = state(source)

    def build():
        model = unifeat.create_model(source, features_only=True)
        assert modes(model) == built, f"built in modes {modes(model)}"
        with torch.no_grad():
            found = model(x)
        assert all(torch.equal(a, b) for a, b in zip(found, maps, strict=True)), "other maps"

    def described():
        assert unifeat.feature_info(source) == info, "other feature_info"

    def named():
        assert unifeat.get_node_names(source) == names, "other node names"

    def frozen():
        model = unifeat.create_model(source, features_only=True)
        found = model.freeze(1)._held_in_eval
        model.unfreeze()
        assert found == held, f"froze {found}, alone {held}"

    def served():
        with torch.no_grad():
            assert torch.equal(source(x), output), "the module itself gave another output"

    calls = [build, described, named, frozen, served] * (threads // 5)
    report = in_threads(calls, rounds)
    if state(source) != before:
        report["errors"].append("the module passed in was left changed")
    return report


source = TinyNet().eval()
report = {
    "tv": in_threads([lambda: unifeat.feature_info("tv:resnet18")] * 4, rounds=3),
    "module": in_threads(
        [lambda: unifeat.create_model(TinyNet(), features_only=True).feature_info] * 4, rounds=16
    ),
    "module-one-source": in_threads(
        [lambda: unifeat.create_model(source, features_only=True).feature_info] * 4, rounds=16
    ),
    "module-one-source-mixed": mixed(),
}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fx_threads_report() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _FX_THREADS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=root,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "check",
    [
        param("tv", id="tv"),
        param("module", id="module"),
        param("module-one-source", id="module-one-source"),
        param("module-one-source-mixed", id="module-one-source-mixed"),
    ],
)
def test_fx_building_from_threads(fx_threads_report: dict[str, Any], check: str) -> None:
    found = fx_threads_report[check]
    assert not found["errors"], f"{len(found['errors'])} calls failed: {found['errors'][:3]}"
    assert found["intact"], "torch.nn.Module.__call__/__getattr__ left patched"
