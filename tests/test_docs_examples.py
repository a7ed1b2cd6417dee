"""Every Python example in ``docs/*.rst`` runs, under torchrun, as the page says.

The conventions the pages follow:

* A Python example is a ``.. code-block:: python`` directive. It is a complete
  script: its first line is the command that runs it, ``# torchrun
  --nproc-per-node N name.py``, and the test runs it with that many ranks.
* A block that is deliberately not a whole program (a line or two continuing the
  page's script) is preceded by the rst comment ``.. fragment`` (optionally
  ``.. fragment: why``). Only those are skipped.
* Output the page promises goes in the first code block after the example,
  preceded by the rst comment ``.. expected-output``: every non-empty line of it
  must be a line some rank prints (ranks print in any order).
* No bare ``::`` literal blocks: sphinx would highlight them as Python without
  the test seeing them. Use ``.. code-block::`` with a language (``text``,
  ``console``, ``python``).

Examples run from a scratch folder, so they import the installed
``dispatch_shard`` (in ``nox -s tests`` a non-editable install), two at a time,
each with a timeout and torchrun's ``--standalone`` rendezvous on a free port.
They are marked ``slow`` (about a minute on 2 cores): ``nox -s tests`` runs them,
``nox -s quick`` only checks the conventions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
TIMEOUT_S = 150  # per example; the slowest (4 ranks on 2 cores) takes ~15 s
PARALLEL = 2  # examples run at once

_DIRECTIVE = re.compile(r"^(\s*)\.\. (?:code-block|code|sourcecode)::\s*(\S*)\s*$")
_LAUNCH = re.compile(r"^#\s*torchrun\s+--nproc-per-node\s+(\d+)\s+(\S+\.py)\s*$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the directive
    language: str
    code: str
    fragment: bool
    expected_output: bool  # preceded by ``.. expected-output``


@dataclass
class Example:
    page: str
    line: int
    code: str
    nproc: int
    name: str
    expected: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _comment_before(lines: list[str], index: int) -> str:
    """The rst comment right before line ``index`` (blank lines between allowed)."""
    i = index - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    if i >= 0 and lines[i].lstrip().startswith("..") and "::" not in lines[i]:
        return lines[i].strip()[2:].strip()
    return ""


def parse_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = len(match.group(1)), match.group(2)
        start = i
        i += 1
        while i < len(lines) and re.match(rf"^\s{{{indent + 1},}}:\w", lines[i]):
            i += 1  # directive options
        body = []
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        margin = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        code = "\n".join(b[margin:] for b in body) + "\n"
        comment = _comment_before(lines, start)
        blocks.append(Block(page.name, start + 1, language, code,
                            fragment=comment.split(":")[0].strip() == "fragment",
                            expected_output=comment == "expected-output"))
    return blocks


def bare_literal_blocks(page: Path) -> list[str]:
    found = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.endswith("::") and not re.match(r"^\.\. [\w:-]+::", stripped):
            found.append(f"{page.name}:{number}: {stripped}")
    return found


def collect() -> tuple[list[Example], list[str]]:
    """The examples to run, and the problems with the pages' conventions."""
    examples, problems = [], []
    for page in sorted(DOCS.glob("*.rst")):
        problems += [f"{where}: a bare literal block; use .. code-block:: <language>"
                     for where in bare_literal_blocks(page)]
        current: Example | None = None
        for block in parse_blocks(page):
            where = f"{block.page}:{block.line}"
            if block.expected_output:
                if current is None or current.expected:
                    problems.append(f"{where}: expected output with no example before it")
                else:
                    current.expected = [ln.strip() for ln in block.code.splitlines()
                                        if ln.strip()]
                continue
            if block.language not in ("python", "python3", "py"):
                continue
            current = None
            if block.fragment:
                continue
            launch = _LAUNCH.match(block.code.splitlines()[0])
            if not launch:
                problems.append(f"{where}: a Python example must start with its command, "
                                "'# torchrun --nproc-per-node N name.py', or be marked "
                                "'.. fragment'")
                continue
            current = Example(block.page, block.line, block.code,
                              int(launch.group(1)), launch.group(2))
            examples.append(current)
    return examples, problems


EXAMPLES, PROBLEMS = collect()


@dataclass
class Outcome:
    returncode: int | None  # None: timed out
    ranks_stdout: list[str]
    output: str  # torchrun's own output and every rank's stderr, for the failure message


def run_example(example: Example, folder: Path) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / example.name
    script.write_text(example.code)
    logs = folder / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(example.nproc), "--redirects", "3",
               "--log-dir", str(logs), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        launcher_output, _ = process.communicate(timeout=TIMEOUT_S)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        # torchrun ends its ranks when it gets SIGTERM (they run in process groups of
        # their own, so killing torchrun's session would leave them behind).
        process.terminate()
        try:
            launcher_output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            launcher_output, _ = process.communicate()
        returncode = None
    stdouts = [p.read_text() for p in sorted(logs.glob("*/attempt_*/*/stdout.log"))]
    stderrs = [f"--- {p.parent.name} stderr\n{p.read_text()}"
               for p in sorted(logs.glob("*/attempt_*/*/stderr.log"))]
    output = "\n".join([launcher_output, *stderrs,
                        *(f"--- stdout\n{s}" for s in stdouts)])
    return Outcome(returncode, stdouts, output)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Outcome]]]:
    """Start every selected example at once, ``PARALLEL`` at a time; tests wait on theirs."""
    selected = {item.callspec.params["example"].id for item in request.session.items
                if getattr(item, "originalname", None) == "test_docs_example"}
    folder = tmp_path_factory.mktemp("docs_examples")
    with ThreadPoolExecutor(PARALLEL) as executor:
        yield {example.id: executor.submit(run_example, example, folder / f"{index:02d}")
               for index, example in enumerate(EXAMPLES) if example.id in selected}


def test_pages_follow_the_conventions() -> None:
    assert EXAMPLES, f"no Python examples found under {DOCS}"
    assert not PROBLEMS, "\n".join(PROBLEMS)


@pytest.mark.slow  # about a minute for all of them: in `nox -s tests`, not in the quick tier
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_docs_example(example: Example, outcomes: dict[str, Future[Outcome]]) -> None:
    outcome = outcomes[example.id].result()
    assert outcome.returncode is not None, (
        f"{example.id} did not finish in {TIMEOUT_S} s:\n{outcome.output}")
    assert outcome.returncode == 0, (
        f"{example.id} exited with {outcome.returncode}:\n{outcome.output}")
    printed = {line.strip() for text in outcome.ranks_stdout for line in text.splitlines()}
    missing = [line for line in example.expected if line not in printed]
    assert not missing, (f"{example.id}: the page says it prints {missing}, but the ranks "
                         f"printed:\n" + "\n".join(outcome.ranks_stdout))
