"""Contributor sessions: tests, consistency, backend, slow, ray, bench, throughput, lint,
typecheck, docs
(`nox -s NAME`; `nox -l` lists them).

Environments are created with uv and reused between runs, so the multi-GB
torch install happens once per session environment, and uv's cache makes
every later environment a matter of seconds.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint"]

CONSTRAINTS = ("-c", "constraints.txt")


def _install(session: nox.Session, extras: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The fast default suite, doctests included (what CI runs)."""
    _install(session, "test,openclip,export,heads")
    session.run("pytest", *session.posargs)


@nox.session
def consistency(session: nox.Session) -> None:
    """Cross-backend consistency: the same architecture, levels and numbers in every
    backend, checked against the recorded table docs/consistency.json."""
    _install(session, "test")
    session.run("pytest", "-m", "consistency", *session.posargs)


# The contract suite's subclasses and each backend's own tests.
_BACKEND_TESTS = {
    "timm": ("tests/test_timm_parity.py", "Timm"),
    "torchvision": ("tests/test_torchvision.py", "Torchvision or Fx"),
    "hf": ("tests/test_hf.py", "Hf"),
}


@nox.session
@nox.parametrize("backend", list(_BACKEND_TESTS))
def backend(session: nox.Session, backend: str) -> None:
    """One backend's tests: its own file and its run of the adapter contract."""
    _install(session, "test")
    own, contract = _BACKEND_TESTS[backend]
    session.run("pytest", own, *session.posargs)
    session.run("pytest", "tests/test_contract.py", "-k", contract, *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """The checks that take 30 s or more each (many hypothesis examples, random kills)."""
    _install(session, "test,openclip,export,heads")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def ray(session: nox.Session) -> None:
    """Extraction on a local Ray cluster (the [ray] extra): the Ray engine and stages
    against the local engine."""
    _install(session, "test,ray")
    session.run("pytest", "-m", "ray", *session.posargs)


@nox.session
def throughput(session: nox.Session) -> None:
    """Extraction throughput in images/s and --fast-decode's effect; writes
    benchmarks/throughput.json (`nox -s throughput -- --quick` for a short run)."""
    _install(session, "test,ray")
    session.run("python", "benchmarks/throughput.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the native paths; writes benchmarks/results.json and
    docs/benchmarks.md (`nox -s bench -- --quick` for a short run)."""
    _install(session, "test")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "unifeat", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "unifeat", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package (the public API is fully annotated)."""
    _install(session, "dev")
    session.run("mypy", "unifeat")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation strictly: a warning fails the build."""
    _install(session, "docs")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")
