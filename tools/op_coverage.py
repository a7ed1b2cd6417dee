"""The op coverage report: the OpInfo differential run over all of ``op_db``.

Runs :mod:`dispatch_shard.testing.opinfo` for every float32 OpInfo of
``op_db`` (``--dtype complex64``: every complex64 one), for dispatch_shard and for
DTensor, on world sizes 2 and 3 (each tensor argument sharded along dim 0 in uneven
blocks), and writes

- ``<out-dir>/results.jsonl``: one line per (library, world size, op) as it
  finishes (``--resume`` skips those already there);
- ``<out-dir>/op_coverage.json``: every sample's outcome and the summary;
- ``<out-dir>/op_coverage.csv``: one row per op;
- ``docs/op_coverage.rst`` (``--rst``): the generated docs page, and beside it
  ``op_coverage_dtensor.rst``, DTensor's wrong results with their conditions.

Run with ``nox -s coverage`` (or ``python tools/op_coverage.py``). It takes a
while: on a 2-core machine, about 10 minutes per world size for dispatch_shard and
an hour per world size for DTensor. ``--report-only`` rewrites the outputs from
``results.jsonl``; ``--libraries dispatch_shard --keep-dtensor`` reruns ours alone and
keeps DTensor's columns of the page it rewrites; ``--from-pages docs/op_coverage.rst``
rewrites the pages from the tables of the pages themselves (every figure they show is in
them), for changing how they look without rerunning.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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
    dtype_ops,
    op_key,
    registration,
    run_op,
    summarize,
)
from dispatch_shard.testing.pool import RankPool

OUTCOMES = (PASS, PARTIAL, UNSUPPORTED, WRONG, ERROR, HANG, SKIP)
LABELS = {"dispatch_shard": "dispatch_shard", "dispatch_shard_2x2": "dispatch_shard 2x2 mesh",
          "dtensor": "DTensor"}


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
    ops = dtype_ops(args.dtype)
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
                                    timeout_s=args.timeout, dtype=args.dtype)
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
          libraries: Sequence[str], dtype: str = "float32") -> list[dict[str, Any]]:
    """One row per op: the merged outcomes per library, and per world size."""
    ops = sorted({key[2] for key in results})
    by_key = {op_key(op): op for op in dtype_ops(dtype)}
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


# -- the docs pages ----------------------------------------------------------------------
#
# The pages render a Coverage: the per-op rows of table(), sample counts and the wrong
# samples. It is built from results.jsonl (coverage_from_results) or, to change how the
# pages look without rerunning hours of ops, from the tables of pages this tool wrote
# before (coverage_from_pages, ``--from-pages``): every figure on the pages is in them.

# The ops/ families in the order an op is filed under (the most specific it reached first).
# ``whole`` first: an op that reached it gathered whole values and computed on every rank.
FAMILY_ORDER = ("whole", "matmul", "attention", "embedding", "spatial", "sorting", "scan",
                "indexing", "advanced_indexing", "reduction", "arg_reduction", "norms",
                "softmax", "pointwise", "random_ops", "foreach", "factory", "decomposed",
                "view", "reshape", "copies", "tensor_basics")
FAMILY_TITLES = {
    "whole": "whole value (gathers, computes on every rank)",
    "matmul": "matrix products", "attention": "attention", "embedding": "embeddings",
    "spatial": "convolution and pooling", "sorting": "sorting and selection",
    "scan": "scans (cumulative ops)", "indexing": "indexing",
    "advanced_indexing": "advanced indexing", "reduction": "reductions",
    "arg_reduction": "reductions with indices", "norms": "variance and norms",
    "softmax": "logsumexp and softmax",
    "pointwise": "pointwise", "random_ops": "random draws", "foreach": "optimizer kernels",
    "factory": "``*_like`` factories", "spatial_backward": "backward kernels of spatial ops",
    "strided": "strided views (``as_strided``)", "losses": "losses",
    "linear_cross_entropy": "fused linear + cross-entropy", "complex": "complex numbers",
    "decomposed": "torch's decompositions", "view": "views and shape ops",
    "reshape": "``view`` and ``reshape``", "copies": "shape ops that copy",
    "tensor_basics": "aliasing, copying, queries",
    "composite": "decomposed by torch before the dispatch",
    "none": "not served (nothing registered)",
}
WHOLE = "whole"
DTENSOR = "dtensor"


@dataclass(frozen=True)
class WrongSample:
    op: str
    world: int
    index: int
    sample: str  # the inputs, as text
    detail: str  # what differed


@dataclass
class Coverage:
    torch_version: str
    worlds: list[int]
    ran: dict[str, list[int]]  # library -> the world sizes it ran
    libraries: list[str]
    rows: list[dict[str, Any]]  # table()'s rows
    samples: dict[str, tuple[Counter[str], Counter[str]]]  # library -> forward, backward
    wrong: dict[str, list[WrongSample]] = field(default_factory=dict)
    dtype: str = "float32"  # the samples' dtype
    kept: list[str] = field(default_factory=list)  # libraries whose columns an earlier run gave


def coverage_from_results(results: dict[tuple[str, int, str], OpResult], worlds: Sequence[int],
                          libraries: Sequence[str], dtype: str = "float32") -> Coverage:
    rows = table(results, worlds, libraries, dtype)
    numbers = summary(rows, results, libraries)
    return Coverage(
        torch.__version__, list(worlds),
        {library: sorted({w for (lib, w, _) in results if lib == library})
         for library in libraries},
        list(libraries), rows,
        {library: (Counter(numbers[library]["samples_forward"]),
                   Counter(numbers[library]["samples_backward"])) for library in libraries},
        {library: [WrongSample(name, world, s.index, s.sample, s.detail)
                   for name, world, s in problems(results, library, WRONG)]
         for library in libraries}, dtype)


def families(row: dict[str, Any]) -> list[str]:
    return [f for f in row["registration"].split("+") if f]


def family(row: dict[str, Any]) -> str:
    """The one family an op is filed under in the summary (the most specific it reached)."""
    reached = families(row)
    for name in FAMILY_ORDER:
        if name in reached:
            return name
    return reached[0] if reached else "none"


def _text(text: str) -> str:
    """Free text as reStructuredText: markup characters escaped (``squeeze_`` is no link)."""
    text = text.replace("\\", "\\\\")
    for char in "`*_|[]":
        text = text.replace(char, "\\" + char)
    return text


def _untext(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _list_table(header: list[str], body: list[list[str]], widths: str,
                title: str = "") -> list[str]:
    """A list-table: cells wrap, so the page needs no sideways scrolling."""
    lines = [f".. list-table:: {title}".rstrip(), "   :header-rows: 1", f"   :widths: {widths}",
             "   :width: 100%", "   :class: coverage", ""]
    for row in [header, *body]:
        for position, cell in enumerate(row):
            lines.append(("   * - " if position == 0 else "     - ") + (cell or ".."))
    return lines


def _outcome_cell(row: dict[str, Any], library: str) -> str:
    """``forward / backward`` (``n/a``: the op has no backward), a whole-value pass marked."""
    forward = row[f"{library}_forward"]
    if not forward:
        return "not run"
    if forward == PARTIAL:
        forward += f" ({row[f'{library}_samples_pass']}/{row[f'{library}_samples']})"
    if library != DTENSOR and WHOLE in families(row) and forward.startswith(PASS):
        forward += " (whole)"
    return f"{forward} / {row[f'{library}_backward'] or 'n/a'}"


def _served_cell(row: dict[str, Any]) -> str:
    served = ", ".join(families(row)) or "none"
    if row["missing"]:
        served += "; missing " + ", ".join(f"``{op}``" for op in row["missing"].split())
    return served


def _label(library: str) -> str:
    return LABELS.get(library, library)


def rst(coverage: Coverage, dtensor_page: str | None = None) -> str:
    """The op coverage page: the per-op table, the summary by family, the outcomes."""
    libraries, rows = coverage.libraries, coverage.rows
    ours = [lib for lib in libraries if lib != DTENSOR]
    label = "coverage-" if coverage.dtype == "float32" else f"coverage-{coverage.dtype}-"
    title = "Op coverage" if coverage.dtype == "float32" else f"Op coverage: {coverage.dtype}"
    worlds = "; ".join(f"{_label(lib)} on {' and '.join(map(str, coverage.ran[lib]))} ranks"
                       for lib in libraries)
    main = ours[0] if ours else libraries[0]
    passing = [row for row in rows if row[f"{main}_forward"] == PASS
               and row[f"{main}_backward"] in (PASS, "")]
    forward_passing = [row for row in rows if row[f"{main}_forward"] == PASS]
    whole = [row for row in forward_passing if WHOLE in families(row)]
    wrong_ours = sum(len(coverage.wrong.get(lib, [])) for lib in ours)
    out = [
        ".. This file is generated by tools/op_coverage.py. Do not edit it by hand:",
        "   regenerate it with ``nox -s coverage``"
        + ("." if coverage.dtype == "float32" else
           f" (``-- --dtype {coverage.dtype} --libraries dispatch_shard --out-dir "
           f"build/op_coverage_{coverage.dtype} --rst docs/op_coverage_{coverage.dtype}.rst``)."),
        "",
        title, "=" * len(title), "",
        f"Every {coverage.dtype} OpInfo of PyTorch's ``op_db`` (torch {coverage.torch_version}), "
        f"{len(rows)} ops, run by",
        ":mod:`dispatch_shard.testing.opinfo` with each tensor argument sharded along dim 0",
        f"in uneven blocks ({worlds}), and compared with the op on the dense sample.",
        f"{_label(main)}: {len(forward_passing)} ops pass forward, {len(passing)} forward "
        f"and backward. {len(whole)} of the forward passes go,",
        "for some samples or all, through the *whole-value* family, which gathers the whole",
        "tensor and computes on every rank: right, but not sharded (marked ``(whole)`` below).",
        f"{_label(main)} gives {wrong_ours or 'no'} wrong results."
        + (f" DTensor's wrong results, and the conditions they occur in, are on "
           f":doc:`{dtensor_page}`." if dtensor_page else ""),
        *([f"{' and '.join(_label(lib) for lib in coverage.kept)}'s columns are kept from an "
           "earlier run (``--keep-dtensor``); ``not run``: an op that run did not have."]
          if coverage.kept else []),
        "",
        "Per op",
        "------",
        "",
        "Each cell is *forward / backward*; ``n/a``: the op has no backward. "
        "Outcomes, and what",
        f"*served by* means, are explained :ref:`below <{label}outcomes>`; "
        f":ref:`{label}families`",
        "sums them up by op family.",
        "",
    ]
    header = ["Op", "Served by", *(_label(lib) for lib in libraries)]
    body = [[f"``{row['op']}``", _served_cell(row),
             *(_outcome_cell(row, lib) for lib in libraries)] for row in rows]
    widths = " ".join(["31", "23", *(str(46 // len(libraries)) for _ in libraries)])
    out += _list_table(header, body, widths)
    out += ["", f".. _{label}families:", "", "What is supported, by op family",
            "-------------------------------", "",
            f"{_label(main)}'s forward outcomes, each op filed under the most specific family "
            "its",
            "sharded forward reached (an op that reached the whole-value family is filed "
            "there).", ""]
    by_family: dict[str, Counter[str]] = {}
    for row in rows:
        by_family.setdefault(family(row), Counter())[row[f"{main}_forward"]] += 1
    order = [*FAMILY_ORDER, *sorted(set(by_family) - set(FAMILY_ORDER))]
    body = []
    for name in order:
        if name not in by_family:
            continue
        counts = by_family[name]
        other = sum(n for o, n in counts.items() if o not in (PASS, PARTIAL, UNSUPPORTED))
        body.append([f"{FAMILY_TITLES.get(name, name)} (``{name}``)",
                     str(sum(counts.values())), str(counts[PASS]), str(counts[PARTIAL]),
                     str(counts[UNSUPPORTED]), str(other)])
    out += _list_table(["Family", "Ops", "PASS", "PARTIAL", "UNSUPPORTED", "SKIP or other"],
                       body, "40 12 12 12 12 12")
    out += ["", f".. _{label}outcomes:", "", "Outcomes", "--------", "",
            f"``PASS``: every sample equals dense (within the OpInfo's {coverage.dtype} "
            "tolerances);",
            "``(whole)``: some of the work went through the whole-value family.",
            "``UNSUPPORTED``: the op raises ``NotImplementedError`` (allowed). ``PARTIAL``: "
            "some",
            "samples pass, the others are unsupported (passing / compared samples). "
            "``WRONG``: some",
            "sample gives a wrong value, shape or dtype, or a plain tensor where dense gives a",
            "tensor (never allowed). ``ERROR``: some sample raises another exception, or the",
            "ranks disagree. ``HANG``: the run of the op timed out or a rank died. ``SKIP``:",
            "nothing to compare (random output, or no tensor argument to shard). An op's",
            "outcome is the worst over its samples and the world sizes.",
            "",
            "*Served by* names the ``dispatch_shard.ops`` families whose implementations the",
            "aten ops of the sharded forward reached (``decomposed``: torch's decomposition",
            "run on ShardedTensors), and the aten ops no family serves (``missing``). Where",
            "the forward reached none, it names the families registered for the op's aten",
            "name (``composite``: torch decomposes the op before it reaches the dispatch;",
            "``none``: nothing registered).",
            "",
            "What the run leaves out, by design:",
            "",
            "* **Sparse layouts.** A ShardedTensor's blocks are strided tensors: ``to_sparse``",
            "  and the other sparse conversions, and sharding a sparse tensor, raise",
            "  ``NotImplementedError`` on every rank with a message that says so.",
            "* **Host arguments.** ``tensor_split``'s ``tensor_indices_or_sections`` is read on",
            "  the host by torch's own kernel before any ``__torch_dispatch__`` sees it, so it",
            "  stays a plain tensor in the run (a ShardedTensor there fails inside torch, as a",
            "  DTensor does; pass a plain tensor or ``indices.tolist()``).",
            "* **Random ops** (``SKIP``: nothing to compare draw for draw). Inside",
            "  :func:`dispatch_shard.random.dense_equivalent` they give exactly the dense values;",
            "  ``tests/test_random.py`` checks that for each of them.",
            "",
            "Totals",
            "------",
            ""]
    header = ["Outcome", *(f"{_label(lib)} ops" for lib in libraries)]
    body = []
    for outcome in OUTCOMES:
        body.append([f"``{outcome}``", *(
            f"{sum(r[f'{lib}_forward'] == outcome for r in rows)} / "
            f"{sum(r[f'{lib}_backward'] == outcome for r in rows)}" for lib in libraries)])
    body.append(["forward and backward pass", *(
        str(sum(r[f"{lib}_forward"] == PASS and r[f"{lib}_backward"] in (PASS, "")
                for r in rows)) for lib in libraries)])
    cols = " ".join(["34", *(str(66 // len(libraries)) for _ in libraries)])
    out += _list_table(header, body, cols, "Ops by outcome (forward / backward)")
    out += [""]
    body = []
    for outcome in (PASS, UNSUPPORTED, WRONG, ERROR, SKIP):
        body.append([f"``{outcome}``", *(
            f"{coverage.samples[lib][0].get(outcome, 0)} / "
            f"{coverage.samples[lib][1].get(outcome, 0)}" for lib in libraries)])
    out += _list_table(["Outcome", *(f"{_label(lib)} samples" for lib in libraries)], body,
                       cols, "Samples by outcome (forward / backward), all world sizes")
    for library in ours:
        heading = f"Wrong results: {_label(library)}"
        out += ["", heading, "-" * len(heading), ""]
        out += _wrong_table(coverage.wrong.get(library, [])) or ["None."]
    if dtensor_page:
        out += ["", ".. toctree::", "   :hidden:", "", f"   {dtensor_page}"]
    return "\n".join(out) + "\n"


def _kind(detail: str) -> str:
    if "a plain tensor where dense gives a tensor" in detail:
        return "a plain tensor instead of a DTensor"
    if "values differ" in detail:
        return "wrong values"
    if "where dense gives" in detail:
        return "wrong shape or dtype"
    if detail.startswith("ranks disagree"):
        return "the ranks disagree"
    return "other"


def _wrong_table(wrong: list[WrongSample]) -> list[str]:
    if not wrong:
        return []
    body = [[f"``{w.op}``", str(w.world), str(w.index), _text(w.sample), _text(w.detail)]
            for w in wrong]
    return _list_table(["Op", "Ranks", "Sample", "Input", "What"], body, "16 6 6 28 44")


def dtensor_rst(coverage: Coverage) -> str:
    """DTensor's wrong results, on a page of their own, with the conditions first."""
    wrong = coverage.wrong.get(DTENSOR, [])
    title = "DTensor's wrong results"
    backward = [w for w in wrong if w.detail.startswith("grad of")]
    out = [
        ".. This file is generated by tools/op_coverage.py. Do not edit it by hand:",
        "   regenerate it with ``nox -s coverage``.",
        "",
        title, "=" * len(title), "",
        "The samples of :doc:`op_coverage` on which DTensor gives a result that differs",
        "from the dense op. They occur under these conditions, all of them:",
        "",
        f"* torch {coverage.torch_version} (DTensor as it ships with it), on CPU with gloo;",
        f"* {' and '.join(map(str, coverage.ran.get(DTENSOR, [])))} ranks, a 1-D mesh;",
        f"* {coverage.dtype} samples of PyTorch's OpInfo ``op_db``;",
        "* every tensor argument of ``ndim >= 1`` distributed with ``distribute_tensor(t,",
        "  mesh, [Shard(0)])``: split along dim 0 in ``torch.chunk`` blocks, uneven when the",
        "  size does not divide (0-dim tensors and other arguments passed as they are);",
        "* forward: the output compared with the dense op's within the OpInfo's tolerances;",
        "  backward: the input gradients of a weighted sum of the outputs.",
        "",
        f"{len(wrong)} samples over {len({w.op for w in wrong})} ops: "
        f"{len(wrong) - len(backward)} forward, {len(backward)} backward.",
        "",
    ]
    kinds = Counter(_kind(w.detail) for w in wrong)
    out += _list_table(["What is wrong", "Samples"],
                       [[kind, str(n)] for kind, n in kinds.most_common()], "70 30")
    out += ["", "*A plain tensor instead of a DTensor*: an op that received DTensor arguments",
            "returned a plain ``torch.Tensor`` (here almost always the gradient of a sharded",
            "input). The harness counts that as wrong whatever its values: a plain tensor on",
            "each rank is not a distributed value, and the next op would treat it as replicated.",
            "",
            "By op", "-----", ""]
    per_op: dict[str, Counter[str]] = {}
    for w in wrong:
        per_op.setdefault(w.op, Counter())[_kind(w.detail)] += 1
    out += _list_table(["Op", "Wrong samples"],
                       [[f"``{op}``", "; ".join(f"{n} {kind}" for kind, n in kinds_.items())]
                        for op, kinds_ in sorted(per_op.items())], "35 65")
    out += ["", "Every sample", "------------", ""]
    out += _wrong_table(wrong) or ["None."]
    return "\n".join(out) + "\n"


def coverage_from_pages(path: str) -> Coverage:
    """A Coverage from pages this tool wrote: the per-op table, the sample totals and the
    wrong results (in the page, or in its DTensor page beside it). Reads this layout and
    the earlier one (csv-tables; one column per library and direction)."""
    text = open(path).read()
    version = re.search(r"torch (\S+?)\)?[,)]", text)
    sections = _sections(text)
    libraries: list[str] = []
    rows = []
    per_op = sections["Per op"]
    old = "csv-table" in per_op
    records = _records(per_op)
    header = records[0]
    for name in header[2:]:
        label = name.replace(" forward", "").replace(" backward", "")
        library = next(lib for lib, lab in {**LABELS, DTENSOR: "DTensor"}.items() if lab == label)
        if library not in libraries:
            libraries.append(library)
    for record in records[1:]:
        served, _, missing = record[1].partition("; missing ")
        row: dict[str, Any] = {
            "op": record[0].strip("`"),
            "registration": "+".join(f.strip() for f in re.split(r"[+,]", served) if f.strip()),
            "missing": " ".join(m.strip("`") for m in re.split(r"[ ,]+", missing)
                                if m.strip("`")),
        }
        cells = record[2:]
        pairs = ([(cells[2 * i], cells[2 * i + 1]) for i in range(len(libraries))] if old
                 else [tuple(c.split(" / ", 1)) for c in cells])
        for library, (forward, backward) in zip(libraries, pairs, strict=True):
            forward = forward.replace(" (whole)", "")
            counts = re.search(r"\((\d+)/(\d+)\)", forward)
            row[f"{library}_forward"] = "" if forward == "not run" else forward.split(" ")[0]
            row[f"{library}_backward"] = "" if backward == "n/a" else backward
            row[f"{library}_samples_pass"] = int(counts.group(1)) if counts else 0
            row[f"{library}_samples"] = int(counts.group(2)) if counts else 0
        rows.append(row)
    samples: dict[str, tuple[Counter[str], Counter[str]]] = {
        lib: (Counter(), Counter()) for lib in libraries}
    totals = _records(sections["Summary" if old else "Totals"], which=1)
    if old:  # one row per library, one column per outcome
        for record in totals[1:]:
            library = libraries[[_label(lib) for lib in libraries].index(record[0])]
            for outcome, cell in zip(totals[0][1:], record[1:], strict=True):
                forward, backward = cell.split(" / ")
                samples[library][0][outcome] = int(forward)
                samples[library][1][outcome] = int(backward)
    else:  # one row per outcome, one column per library
        for record in totals[1:]:
            for library, cell in zip(libraries, record[1:], strict=True):
                forward, backward = cell.split(" / ")
                samples[library][0][record[0].strip("`")] = int(forward)
                samples[library][1][record[0].strip("`")] = int(backward)
    wrong: dict[str, list[WrongSample]] = {}
    dtensor_page = os.path.join(os.path.dirname(path), "op_coverage_dtensor.rst")
    wrong_sections = dict(sections)
    if os.path.exists(dtensor_page):
        wrong_sections["Wrong results: DTensor"] = _sections(open(dtensor_page).read())[
            "Every sample"]
    for library in libraries:
        body = wrong_sections.get(f"Wrong results: {_label(library)}", "")
        wrong[library] = [WrongSample(r[0].strip("`"), int(r[1]), int(r[2]), _untext(r[3]),
                                      _untext(r[4])) for r in _records(body)[1:]]
    ran_text = re.search(r"World sizes run: (.*?) \(an op", text, re.S)
    ran: dict[str, list[int]] = {}
    if ran_text:  # the earlier layout: "dispatch_shard 2 and 3; DTensor 2"
        for part in ran_text.group(1).split(";"):
            label, numbers = re.match(r"(.*?) ([\d and]+)$", part.strip()).groups()
            ran[next(lib for lib in libraries if _label(lib) == label)] = [
                int(n) for n in numbers.split(" and ")]
    else:  # this layout: "(dispatch_shard on 2 and 3 ranks; DTensor on 2 ranks)"
        for library in libraries:
            found = re.search(rf"{re.escape(_label(library))} on ([\d and]+) ranks", text)
            ran[library] = [int(n) for n in found.group(1).split(" and ")] if found else []
    worlds = sorted({w for ws in ran.values() for w in ws})
    dtype = re.search(r"Every (\w+) OpInfo", text)
    kept = re.search(r"\n(.*)'s columns are kept from an earlier run", text)
    return Coverage(version.group(1) if version else "?", worlds, ran, libraries, rows,
                    samples, wrong, dtype.group(1) if dtype else "float32",
                    [lib for lib in libraries if kept and _label(lib) in kept.group(1)])


def _sections(text: str) -> dict[str, str]:
    """A page's level-2 sections (title underlined with ``-``), by title."""
    parts = re.split(r"\n([^\n]+)\n-+\n", "\n" + text)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _records(section: str, which: int = 0) -> list[list[str]]:
    """The rows of the ``which``-th table in a section: a csv-table or a list-table."""
    tables = re.split(r"\n\.\. (?:csv-table|list-table)::", section)[1:]
    if len(tables) <= which:
        return []
    lines = [ln for ln in tables[which].splitlines()[1:]
             if ln.strip() and not ln.strip().startswith(":")]
    if lines and lines[0].lstrip().startswith('"'):  # csv-table
        out = []
        for ln in lines:
            if not ln.startswith("   "):
                break
            out.append([c.replace('""', '"') for c in next(csv.reader([ln.strip()],
                                                                   skipinitialspace=True))])
        return out
    out = []
    for ln in lines:
        if ln.startswith("   * - "):
            out.append([ln[7:]])
        elif ln.startswith("     - "):
            out[-1].append(ln[7:])
        else:
            break
    return [[c if c != ".." else "" for c in row] for row in out]


def report(args: argparse.Namespace, jsonl: str) -> dict[str, Any]:
    results = load(jsonl)
    if not results:
        raise SystemExit(f"no results in {jsonl}")
    worlds = sorted({key[1] for key in results})
    libraries = [lib for lib in LIBRARIES if any(key[0] == lib for key in results)]
    rows = table(results, worlds, libraries, args.dtype)
    numbers = summary(rows, results, libraries)
    meta = {"torch": torch.__version__, "worlds": worlds, "libraries": libraries,
            "dtype": args.dtype, "device": "cpu", "sharding": "dim 0, uneven chunks"}
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
        coverage = coverage_from_results(results, worlds, libraries, args.dtype)
        if args.keep_dtensor and os.path.exists(args.rst):
            coverage = keep_columns(coverage, coverage_from_pages(args.rst), [DTENSOR])
        write_pages(coverage, args.rst)
    return numbers


def keep_columns(new: Coverage, old: Coverage, libraries: Sequence[str]) -> Coverage:
    """``new`` with the columns, sample totals and wrong results of ``libraries`` taken from
    ``old`` (pages read by coverage_from_pages): rerunning dispatch_shard (minutes) keeps
    DTensor's figures (hours) from the last run that had them. An op that ``old`` lacks gets
    empty cells for them."""
    kept = [lib for lib in libraries if lib in old.libraries and lib not in new.libraries]
    old_rows = {row["op"]: row for row in old.rows}
    rows = []
    for row in new.rows:
        row = dict(row)
        before = old_rows.get(row["op"], {})
        for library in kept:
            for key in ("forward", "backward", "samples_pass", "samples"):
                row[f"{library}_{key}"] = before.get(f"{library}_{key}",
                                                     0 if key.startswith("samples") else "")
        rows.append(row)
    return Coverage(new.torch_version, sorted({*new.worlds, *(w for lib in kept
                                                               for w in old.ran[lib])}),
                    {**new.ran, **{lib: old.ran[lib] for lib in kept}},
                    [*new.libraries, *kept], rows,
                    {**new.samples, **{lib: old.samples[lib] for lib in kept}},
                    {**new.wrong, **{lib: old.wrong.get(lib, []) for lib in kept}}, new.dtype,
                    [*new.kept, *kept])


def write_pages(coverage: Coverage, path: str) -> None:
    """The op coverage page at ``path``, and DTensor's wrong results beside it."""
    dtensor_page = None
    if DTENSOR in coverage.libraries:
        dtensor_page = "op_coverage_dtensor"
        with open(os.path.join(os.path.dirname(path), dtensor_page + ".rst"), "w") as f:
            f.write(dtensor_rst(coverage))
    with open(path, "w") as f:
        f.write(rst(coverage, dtensor_page))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--dtype", choices=("float32", "complex64"), default="float32",
                        help="the samples' dtype (default float32)")
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
    parser.add_argument("--from-pages", metavar="RST", default=None,
                        help="rewrite the pages from the tables of the pages at RST (and its "
                        "DTensor page beside it), running nothing: for changing how they look")
    parser.add_argument("--keep-dtensor", action="store_true",
                        help="keep DTensor's columns of the page at --rst (when this run has "
                        "no DTensor results): rerun dispatch_shard alone and keep the rest")
    args = parser.parse_args(argv)
    if args.from_pages:
        write_pages(coverage_from_pages(args.from_pages), args.rst or args.from_pages)
        return 0
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
