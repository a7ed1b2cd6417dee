"""Project sessions: ``nox -s tests quick properties lint typecheck docs bench coverage demo
soak``.

NOTE [which torch the sessions use]
Every session runs in its own virtualenv, without the interpreter's site-packages,
so a dependency the package forgets to declare fails here as it would for a user
(a system numpy once hid one). Sessions install ``torch==2.13.*``, which on a
CPU-only machine with a local CPU wheel takes that wheel and never pulls CUDA
packages. To use another torch build (CUDA, say), set ``DISPATCH_SHARD_TORCH`` to
the pip arguments that install it, e.g.::

    export DISPATCH_SHARD_TORCH="torch==2.13.* --index-url https://download.pytorch.org/whl/cu128"
    nox -s tests
"""

from __future__ import annotations

import os
import shlex

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

VENV_PARAMS: list[str] = []  # no system site-packages: see the NOTE above
TORCH = shlex.split(os.environ.get("DISPATCH_SHARD_TORCH", "torch==2.13.*"))


def install(session: nox.Session, extras: str = "") -> None:
    session.install(*TORCH)
    session.install(f".[{extras}]" if extras else ".")


@nox.session(venv_params=VENV_PARAMS)
def tests(session: nox.Session) -> None:
    """The test suite (multi-rank tests run on a persistent gloo rank pool)."""
    install(session, "dev")
    _pytest(session, session.posargs or ["-q"])


@nox.session(venv_params=VENV_PARAMS)
def quick(session: nox.Session) -> None:
    """The quick tier: every test not marked ``slow`` (about 3 minutes on 2 cores)."""
    install(session, "dev")
    _pytest(session, ["-q", "-m", "not slow", *session.posargs])


def _pytest(session: nox.Session, args: list[str]) -> None:
    # Run from a scratch folder so that the installed package (with ops/ as
    # dispatch_shard.ops) is tested, not the checkout.
    tests_dir = os.path.join(session.invoked_from, "tests")
    session.chdir(session.create_tmp())
    session.run("python", "-m", "pytest", tests_dir, *args,
                env={"PYTHONDONTWRITEBYTECODE": "1"})


@nox.session(venv_params=VENV_PARAMS)
def properties(session: nox.Session) -> None:
    """The property-based tests with the long hypothesis profile (random examples, ten
    times the CI count, world sizes 1-4; see docs/reliability.rst)."""
    install(session, "dev")
    tests_file = os.path.join(session.invoked_from, "tests", "test_properties.py")
    args = session.posargs or ["-q", "-s"]
    session.chdir(session.create_tmp())
    # Each test runs thousands of examples: lift pyproject's 300 s per-test safety net
    # (every example still has its own timeout on the rank pool).
    session.run("python", "-m", "pytest", tests_file, "--timeout=3600", *args,
                env={"PYTHONDONTWRITEBYTECODE": "1", "HYPOTHESIS_PROFILE": "long"})


@nox.session(venv_params=VENV_PARAMS)
def lint(session: nox.Session) -> None:
    """ruff on the package, the ops, the tests and the tools."""
    session.install("ruff>=0.6")
    session.run("python", "-m", "ruff", "check",
                "dispatch_shard", "ops", "tests", "tools", "noxfile.py")


@nox.session(venv_params=VENV_PARAMS)
def typecheck(session: nox.Session) -> None:
    """Strict mypy on the installed package, dispatch_shard.ops included."""
    install(session, "dev")
    # Check the installed copy (where ops/ is dispatch_shard.ops), from outside the checkout.
    tmp = session.create_tmp()
    session.chdir(tmp)
    config = os.path.join(session.invoked_from, "pyproject.toml")
    session.run("python", "-m", "mypy", "--config-file", config, "-p", "dispatch_shard")


@nox.session(venv_params=VENV_PARAMS)
def docs(session: nox.Session) -> None:
    """Sphinx HTML docs, warnings are errors."""
    install(session, "docs")
    session.run("python", "-m", "sphinx", "-W", "--keep-going", "-b", "html",
                "docs", "docs/_build/html")


@nox.session(venv_params=VENV_PARAMS)
def bench(session: nox.Session) -> None:
    """Benchmarks against DTensor and the legacy ShardedTensor (see tools/); the dev extras
    bring ``transformers`` for section 7's GPT-2."""
    install(session, "dev")
    session.run("python", "tools/bench.py", *session.posargs)


@nox.session(venv_params=VENV_PARAMS)
def coverage(session: nox.Session) -> None:
    """The op coverage report: the OpInfo differential run over all of op_db, dispatch_shard
    and DTensor, world sizes 2 and 3 (on two cores ~10 min per world size for dispatch_shard,
    ~1 h for DTensor; `-- --libraries dispatch_shard` runs ours alone). Regenerates
    docs/op_coverage.rst; JSON and CSV go to build/op_coverage/ (see tools/op_coverage.py)."""
    install(session, "dev")  # torch.testing._internal needs expecttest
    # By path, not -m: then sys.path[0] is tools/ and the installed package is the one run.
    session.run("python", "tools/op_coverage.py", "--out-dir", "build/op_coverage",
                "--rst", "docs/op_coverage.rst", *session.posargs,
                env={"PYTHONDONTWRITEBYTECODE": "1"})


@nox.session(venv_params=VENV_PARAMS)
def demo(session: nox.Session) -> None:
    """The demo: 4 CPU ranks train a sharded model (python -m dispatch_shard.demo)."""
    install(session)
    session.run("python", "-m", "dispatch_shard.demo", *session.posargs)


@nox.session(venv_params=VENV_PARAMS)
def soak(session: nox.Session) -> None:
    """2000 training steps of the demo model on 4 CPU ranks: RSS, live tensors, caches,
    threads and process groups stay flat after warm-up (tools/soak.py; ~15 minutes on two
    cores). tests/test_soak.py is the short CI version."""
    install(session)
    # By path: sys.path[0] is tools/, so the ranks import soak.py by name, and the
    # installed package is the one run.
    session.run("python", "tools/soak.py", *session.posargs,
                env={"PYTHONDONTWRITEBYTECODE": "1"})
