"""The benchmark table in docs/performance.md is the one `make bench` wrote, and that one is bench/results.csv's."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_runner():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_performance_doc_holds_bench_results_md():
    run = load_runner()
    block = run.doc_block((REPO / "docs" / "performance.md").read_text(encoding="utf-8"))
    assert block == (REPO / "bench" / "results.md").read_text(encoding="utf-8"), (
        "docs/performance.md's table differs from bench/results.md: run `make bench`, or copy bench/results.md "
        f"between {run.BEGIN} and {run.END}")


def test_results_md_table_is_results_csv():
    run = load_runner()
    rows = run.read_csv(REPO / "bench" / "results.csv")
    assert rows and set(rows[0]) == set(run.COLUMNS)
    table = run.markdown(rows, {}).split("\n\n")[0]
    assert (REPO / "bench" / "results.md").read_text(encoding="utf-8").startswith(table + "\n\n")
