"""The op coverage report: the OpInfo differential run over all of ``op_db``.

Runs :mod:`dispatch_shard.testing.opinfo` for every float32 OpInfo of
``op_db``, for dispatch_shard and for DTensor, on world sizes 2 and 3 (each
tensor argument sharded along dim 0 in uneven blocks), and writes

- ``<out-dir>/results.jsonl``: one line per (library, world size, op) as it
  finishes (``--resume`` skips those already there);
- ``<out-dir>/op_coverage.json``: every sample's outcome and the summary;
- ``<out-dir>/op_coverage.csv``: one row per op;
- ``docs/op_coverage.rst`` (``--rst``): the generated docs page.

Run with ``nox -s coverage`` (or ``python tools/op_coverage.py``). It takes a
while: on a 2-core machine, about 10 minutes per world size for dispatch_shard and
an hour per world size for DTensor. ``--report-only`` rewrites the outputs from
``results.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dispatch_shard.testing.opinfo import (
    ERROR,
    HANG,
    LIBRARIES,
    PARTIAL,
    PASS,
    SKIP,
    UNSUPPORTED,
    WRONG,
    OpResult,
    float32_ops,
    op_key,
    registration,
    run_op,
    summarize,
)
from dispatch_shard.testing.pool import RankPool

OUTCOMES = (PASS, PARTIAL, UNSUPPORTED, WRONG, ERROR, HANG, SKIP)
LABELS = {"dispatch_shard": "dispatch_shard", "dtensor": "DTensor"}


def merge(outcomes: Iterable[str]) -> str:
    """One op outcome from several world sizes' (worst first, PARTIAL for a mix)."""
    return summarize(outcomes)


def load(path: str) -> dict[tuple[str, int, str], OpResult]:
    results: dict[tuple[str, int, str], OpResult] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    result = OpResult.from_json(json.loads(line))
                    results[(result.library, result.world_size, result.op)] = result
    return results


def run(args: argparse.Namespace, jsonl: str) -> None:
    done = load(jsonl) if args.resume else {}
    if not args.resume and os.path.exists(jsonl):
        os.remove(jsonl)
    ops = float32_ops()
    if args.ops:
        wanted = set(args.ops.split(","))
        ops = [op for op in ops if op_key(op) in wanted]
    for world_size in args.worlds:
        for library in args.libraries:
            todo = [op for op in ops if (library, world_size, op_key(op)) not in done]
            if not todo:
                continue
            pool = RankPool(world_size, pg_timeout_s=args.pg_timeout)
            began = time.monotonic()
            try:
                for position, op in enumerate(todo):
                    result = run_op(op, pool, library, max_samples=args.max_samples,
                                    timeout_s=args.timeout)
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(result.to_json()) + "\n")
                    print(f"[{library} w{world_size} {position + 1}/{len(todo)} "
                          f"{time.monotonic() - began:6.0f}s] {result.op}: "
                          f"forward {result.forward}, backward {result.backward or '-'} "
                          f"({len(result.samples)} samples, {result.seconds:.1f}s)", flush=True)
            finally:
                pool.stop()


# -- the report -----------------------------------------------------------------

def table(results: dict[tuple[str, int, str], OpResult], worlds: Sequence[int],
          libraries: Sequence[str]) -> list[dict[str, Any]]:
    """One row per op: the merged outcomes per library, and per world size."""
    ops = sorted({key[2] for key in results})
    by_key = {op_key(op): op for op in float32_ops()}
    rows = []
    for name in ops:
        dispatched: dict[str, str] = {}
        for w in worlds:
            mine = results.get(("dispatch_shard", w, name))
            if mine is not None:
                dispatched.update(mine.dispatched)
        families = sorted({f for f in dispatched.values() if f != "missing"},
                          key=lambda f: (f == "decomposed", f))
        row: dict[str, Any] = {
            "op": name,
            # What the sharded runs reached; by the op's aten name where they reached nothing.
            "registration": "+".join(families) if families
            else registration(by_key[name]) if name in by_key else "?",
            "missing": " ".join(sorted(k for k, f in dispatched.items() if f == "missing")),
            "dispatched": " ".join(sorted(dispatched)),
        }
        for library in libraries:
            mine = [results[(library, w, name)] for w in worlds if (library, w, name) in results]
            row[f"{library}_forward"] = merge(r.forward for r in mine)
            row[f"{library}_backward"] = merge(r.backward for r in mine) if any(
                r.autograd for r in mine) else ""
            row[f"{library}_samples_pass"] = sum(r.count(PASS) for r in mine)
            row[f"{library}_samples"] = sum(
                len(r.samples) - r.count(SKIP) for r in mine)
            for r in mine:
                row[f"{library}_w{r.world_size}_forward"] = r.forward
                row[f"{library}_w{r.world_size}_backward"] = r.backward
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]], results: dict[tuple[str, int, str], OpResult],
            libraries: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for library in libraries:
        forward = Counter(row[f"{library}_forward"] for row in rows)
        backward = Counter(row[f"{library}_backward"] for row in rows
                           if row[f"{library}_backward"])
        both = sum(row[f"{library}_forward"] == PASS and row[f"{library}_backward"] in (PASS, "")
                   for row in rows)
        samples: Counter[str] = Counter()
        samples_backward: Counter[str] = Counter()
        for (lib, _, _), result in results.items():
            if lib == library:
                samples.update(s.forward for s in result.samples)
                samples_backward.update(s.backward for s in result.samples if s.backward)
        out[library] = {"ops_forward": dict(forward), "ops_backward": dict(backward),
                        "ops_forward_and_backward_pass": both,
                        "ops_with_a_passing_sample": sum(
                            row[f"{library}_forward"] in (PASS, PARTIAL) for row in rows),
                        "samples_forward": dict(samples),
                        "samples_backward": dict(samples_backward)}
    return out


def problems(results: dict[tuple[str, int, str], OpResult], library: str, outcome: str
             ) -> list[tuple[str, int, Any]]:
    found = []
    for (lib, world, name), result in sorted(results.items()):
        if lib != library:
            continue
        for sample in result.samples:
            if outcome in (sample.forward, sample.backward):
                found.append((name, world, sample))
    return found


def _cell(text: str) -> str:
    return text.replace('"', '""')


def _text(text: str) -> str:
    """Free text as reStructuredText: markup characters escaped (``squeeze_`` is no link)."""
    text = text.replace("\\", "\\\\")
    for char in "`*_|[]":
        text = text.replace(char, "\\" + char)
    return text


def _csv_table(header: list[str], body: list[list[str]], widths: str | None = None) -> list[str]:
    lines = ["   :header-rows: 1"]
    if widths:
        lines.append(f"   :widths: {widths}")
    lines.append("")
    for row in [header, *body]:
        lines.append("   " + ", ".join(f'"{_cell(c)}"' for c in row))
    return lines


def rst(rows: list[dict[str, Any]], results: dict[tuple[str, int, str], OpResult],
        worlds: Sequence[int], libraries: Sequence[str]) -> str:
    numbers = summary(rows, results, libraries)
    ran = {library: sorted({w for (lib, w, _) in results if lib == library and w in worlds})
           for library in libraries}
    title = "Op coverage"
    out = [
        ".. This file is generated by tools/op_coverage.py. Do not edit it by hand:",
        "   regenerate it with ``nox -s coverage``.",
        "",
        title, "=" * len(title), "",
        "Every float32 OpInfo of PyTorch's ``op_db`` "
        f"(``torch.testing._internal.common_methods_invocations``, torch {torch.__version__}),",
        "run by :mod:`dispatch_shard.testing.opinfo` on world sizes "
        f"{' and '.join(map(str, worlds))}: each tensor argument of ``ndim >= 1`` is sharded",
        "along dim 0 in uneven blocks (0-dim tensors and other arguments stay as they are),",
        "and the result is compared with the op on the dense sample. Backward compares the",
        "input gradients of a weighted sum of the outputs. The same harness runs DTensor",
        "(``distribute_tensor(t, mesh, [Shard(0)])``) for comparison.",
        "",
        "World sizes run: " + "; ".join(
            f"{LABELS[library]} {' and '.join(map(str, ran[library])) or 'none'}"
            for library in libraries) + " (an op's outcome is the worst over its library's",
        "world sizes; the sample counts add them up).",
        "",
        "Regenerate this page with ``nox -s coverage`` (it runs ``tools/op_coverage.py``: on",
        "two cores about 10 minutes per world size for dispatch_shard and an hour for DTensor;",
        "the JSON and CSV with every sample's outcome go to ``build/op_coverage/``).",
        "",
        "Outcomes",
        "--------",
        "",
        "``PASS``: every sample equals dense (within the OpInfo's float32 tolerances).",
        "``UNSUPPORTED``: the op raises ``NotImplementedError`` (allowed). ``PARTIAL``: some",
        "samples pass, the others are unsupported. ``WRONG``: some sample gives a wrong",
        "value, shape or dtype, or a plain tensor where dense gives a tensor (never",
        "allowed). ``ERROR``: some sample raises another exception, or the ranks disagree.",
        "``HANG``: the run of the op timed out or a rank died. ``SKIP``: nothing to compare",
        "(random output, or no tensor argument to shard). An op's outcome is the worst",
        "over its samples and the world sizes.",
        "",
        "*Served by* names the ``dispatch_shard.ops`` families whose implementations the",
        "aten ops of the sharded forward reached (``decomposed``: torch's decomposition run",
        "on ShardedTensors), and the aten ops no family serves (``missing``). Where the",
        "forward reached none, it names the families registered for the op's aten name",
        "(``composite``: torch decomposes the op before it reaches the dispatch; ``none``:",
        "nothing registered).",
        "",
        "Summary",
        "-------",
        "",
        ".. csv-table:: Ops by outcome (forward / backward)",
    ]
    header = ["Library", *OUTCOMES, "Forward and backward pass"]
    body = []
    for library in libraries:
        n = numbers[library]
        body.append([LABELS[library]]
                    + [f"{n['ops_forward'].get(o, 0)} / {n['ops_backward'].get(o, 0)}"
                       for o in OUTCOMES]
                    + [str(n["ops_forward_and_backward_pass"])])
    out += _csv_table(header, body)
    out += ["", ".. csv-table:: Samples by outcome (forward / backward), all world sizes"]
    sample_outcomes = (PASS, UNSUPPORTED, WRONG, ERROR, SKIP)
    body = []
    for library in libraries:
        n = numbers[library]
        body.append([LABELS[library]]
                    + [f"{n['samples_forward'].get(o, 0)} / {n['samples_backward'].get(o, 0)}"
                       for o in sample_outcomes])
    out += _csv_table(["Library", *sample_outcomes], body)
    for library in libraries:
        wrong = problems(results, library, WRONG)
        heading = f"Wrong results: {LABELS[library]}"
        out += ["", heading, "-" * len(heading), ""]
        if not wrong:
            out += ["None."]
            continue
        out += [".. csv-table::"]
        out += _csv_table(["Op", "World", "Sample", "Input", "What"],
                          [[f"``{name}``", str(world), str(s.index), _text(s.sample),
                            _text(s.detail)] for name, world, s in wrong], "15 5 5 30 45")
    out += ["", "Per op", "------", "", ".. csv-table::"]
    header = ["Op", "Served by"]
    for library in libraries:
        header += [f"{LABELS[library]} forward", f"{LABELS[library]} backward"]
    body = []
    for row in rows:
        served = row["registration"]
        if row["missing"]:
            served += "; missing " + " ".join(f"``{op}``" for op in row["missing"].split())
        cells = [f"``{row['op']}``", served]
        for library in libraries:
            forward = row[f"{library}_forward"]
            if forward == PARTIAL:
                forward += f" ({row[f'{library}_samples_pass']}/{row[f'{library}_samples']})"
            cells += [forward, row[f"{library}_backward"] or "n/a"]
        body.append(cells)
    out += _csv_table(header, body)
    return "\n".join(out) + "\n"


def report(args: argparse.Namespace, jsonl: str) -> dict[str, Any]:
    results = load(jsonl)
    if not results:
        raise SystemExit(f"no results in {jsonl}")
    worlds = sorted({key[1] for key in results})
    libraries = [lib for lib in LIBRARIES if any(key[0] == lib for key in results)]
    rows = table(results, worlds, libraries)
    numbers = summary(rows, results, libraries)
    meta = {"torch": torch.__version__, "worlds": worlds, "libraries": libraries,
            "dtype": "float32", "device": "cpu", "sharding": "dim 0, uneven chunks"}
    with open(os.path.join(args.out_dir, "op_coverage.json"), "w") as f:
        json.dump({"meta": meta, "summary": numbers, "ops": rows,
                   "results": [r.to_json() for r in results.values()]}, f, indent=1)
    with open(os.path.join(args.out_dir, "op_coverage.csv"), "w", newline="") as f:
        fields = sorted({k for row in rows for k in row},
                        key=lambda k: (k != "op", k != "registration", k))
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    if args.rst:
        with open(args.rst, "w") as f:
            f.write(rst(rows, results, worlds, libraries))
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--ops", help="comma-separated OpInfo names (name.variant); default all")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="run at most this many samples of each op (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for all samples of one op before it counts as HANG")
    parser.add_argument("--pg-timeout", type=float, default=20.0,
                        help="the process group timeout: how long a rank waits for the others")
    parser.add_argument("--out-dir", default=os.path.join("build", "op_coverage"))
    parser.add_argument("--rst", default=None, help="write the docs page here")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in results.jsonl")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the outputs from results.jsonl")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when dispatch_shard gives a WRONG result")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    jsonl = os.path.join(args.out_dir, "results.jsonl")
    if not args.report_only:
        run(args, jsonl)
    numbers = report(args, jsonl)
    for library, n in numbers.items():
        print(f"{LABELS[library]}: ops forward {n['ops_forward']}, backward "
              f"{n['ops_backward']}, forward and backward pass "
              f"{n['ops_forward_and_backward_pass']}")
    wrong = problems(load(jsonl), "dispatch_shard", WRONG)
    for name, world, sample in wrong:
        print(f"WRONG dispatch_shard {name} world {world} sample {sample.index} "
              f"({sample.sample}): {sample.detail}")
    return 1 if wrong and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
