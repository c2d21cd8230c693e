"""Run every standing speed benchmark; write bench/results.csv, bench/results.md and docs/performance.md's table.

    make bench                                   # all of them (about 10 minutes on 2 CPU cores)
    python bench/run.py --only stats_one_pass    # some of them: prints their rows, writes nothing

A standing benchmark compares this project's implementation with a baseline (the reference
implementations' way, or the alternative the code chose against) in one process, the two
alternating (bench/common.py: interleaved), and reports the ratio of their median times; it asserts
nothing about time. Each script in BENCHMARKS has a `standing(ctx)` that returns rows
(bench/common.py: result_row) at sizes that keep the whole run near 10 minutes; the scripts' own
command lines take the larger sizes docs/performance.md quotes. Those on SmolLM2-135M skip with the
reason when its prepared model, records or tasks are absent (resources/smollm2/, made by
`snakemake --configfile configs/smollm2.yaml ... data/records.json`).

After a full run the table goes to bench/results.csv (one row per comparison, with the machine and
the date) and bench/results.md, and replaces the block between BEGIN and END in
docs/performance.md (tests/test_bench_results.py checks that the two agree).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_CSV = HERE / "results.csv"
RESULTS_MD = HERE / "results.md"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# the standing benchmarks, in the order they run: those on the toy bench model, then SmolLM2's
BENCHMARKS = ("stats_one_pass", "batched_vs_loop", "smollm2_speed", "downstream_speed", "grace_training",
              "grace_downstream", "mlp_layout", "attention_layout")
COLUMNS = ("benchmark", "case", "ours", "baseline", "ours_s", "baseline_s", "ratio", "check", "machine", "date")
SHOWN = ("benchmark", "case", "ours", "baseline", "ours_s", "baseline_s", "ratio", "check")


def machine_line(threads: int) -> str:
    """Platform, CPU model, cores, Python and torch versions, and the torch threads the run used."""
    import torch
    from editlib.toy.pinned import machine

    cpu = machine()["cpu"]
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, {threads} torch threads")


def number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def markdown(rows: list[dict], skipped: dict[str, str], load: str = "") -> str:
    """bench/results.md: the table of `rows` (as read back from bench/results.csv), then the
    machine, the date, the load, the command and the benchmarks that skipped, with why."""
    lines = ["| " + " | ".join(SHOWN) + " |", "|" + "|".join("---" for _ in SHOWN) + "|"]
    for row in rows:
        cells = [number(float(row[c])) if c in ("ours_s", "baseline_s") else
                 f"**{float(row[c]):.2f}**" if c == "ratio" else str(row[c]).replace("|", "\\|") for c in SHOWN]
        lines.append("| " + " | ".join(cells) + " |")
    machines = sorted({row["machine"] for row in rows})
    dates = sorted({row["date"] for row in rows})
    lines += ["", f"`make bench` on {'; '.join(machines) or 'this machine'}, {', '.join(dates)}{load}. Times are "
              "medians in seconds of the two ways run alternately in one process; ratio = baseline_s / ours_s (above 1: "
              "ours is faster; against a FLOP bound, the fraction of the bound reached)."]
    if skipped:
        lines += ["", "Skipped here:", ""] + [f"- {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def read_csv(path: Path = RESULTS_CSV) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_results(rows: list[dict], skipped: dict[str, str], load: str = "") -> str:
    """bench/results.csv and bench/results.md from `rows`; returns the markdown."""
    with open(RESULTS_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: (repr(row[c]) if isinstance(row[c], float) else row[c]) for c in COLUMNS} for row in rows)
    text = markdown(read_csv(RESULTS_CSV), skipped, load)
    RESULTS_MD.write_text(text, encoding="utf-8")
    return text


def doc_block(doc: str) -> str:
    """The text between BEGIN's line and END's line of docs/performance.md."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"{DOC} must hold one {BEGIN} line and, after it, one {END} line")
    return doc[doc.index(BEGIN) + len(BEGIN) + 1 : doc.index(END)]


def update_doc(table: str, path: Path = DOC) -> None:
    doc = path.read_text(encoding="utf-8")
    old = doc_block(doc)
    start = doc.index(BEGIN) + len(BEGIN) + 1
    path.write_text(doc[:start] + table + doc[start + len(old) :], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(BENCHMARKS)} (writes nothing)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--smollm2-dir", type=Path, default=None,
                        help="the prepared SmolLM2 folder (default resources/smollm2/SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; of {', '.join(BENCHMARKS)}")

    sys.path[:0] = [str(HERE), str(ROOT)]  # the scripts' `common`, and this checkout's editlib
    import torch

    import common

    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    print(f"# {machine}", flush=True)
    ctx = common.Context(args.threads, **({"smollm2_dir": args.smollm2_dir} if args.smollm2_dir else {}))
    rows, skipped = [], {}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for name in names:
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            found = importlib.import_module(name).standing(ctx)
        except common.Skip as why:
            skipped[name] = str(why)
            print(f"# {name}: skipped, {why}", flush=True)
            continue
        rows += [{**row, "machine": machine, "date": date} for row in found]
        print(f"# {name}: {time.perf_counter() - start:.0f} s", flush=True)
        common.print_table(found, ("case", "ours", "baseline", "ours_s", "baseline_s", "ratio", "check"))
    seconds = time.perf_counter() - started
    # other work on the machine slows both ways of a row, but not always alike
    load = (f", {seconds / 60:.0f} minutes, load average {load_before:.1f} at the start and "
            f"{os.getloadavg()[0]:.1f} at the end")
    print(f"# all: {seconds:.0f} s{load}", flush=True)
    if args.only:
        return 0
    update_doc(write_results(rows, skipped, load))
    print(f"# wrote {RESULTS_CSV.relative_to(ROOT)}, {RESULTS_MD.relative_to(ROOT)} and the table in "
          f"{DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
