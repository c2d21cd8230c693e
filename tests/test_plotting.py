"""The figures do not exaggerate: every panel of a metric shares one y range (the metric's full
range unless figures.y_limits sets another), every panel has its x tick labels, and the unedited
model's value is drawn wherever the table holds it. Each figure is caught before it is saved."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml

from editlib.study import plotting
from editlib.study.ablations import ablation_tables

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions would save, drawn (tick labels laid out), in order."""
    figures = []

    def keep(figure, path):
        figure.canvas.draw()
        figures.append(figure)

    monkeypatch.setattr(plotting, "_save", keep)
    yield figures
    plt.close("all")


def _edit_row(**values) -> dict:
    row = {"experiment": "sequential", "model": "m", "layers": "0", "sample": 0, "scope": "edited_so_far",
           "records": "counterfact", "step": 0}
    row.update(values)
    for metric in plotting.EDIT_METRICS:
        row.setdefault(metric, 90.0)
        row[f"{metric}_lo"], row[f"{metric}_hi"] = row[metric] - 0.5, min(row[metric] + 0.5, 100.0)
    return row


def _sequential_edits() -> pd.DataFrame:
    """Two methods: one wiggles 100 -> 99.2, the other collapses 100 -> 60 (ES and S)."""
    rows = []
    for method, last in (("wiggle", 99.2), ("collapse", 60.0)):
        for batch_size in (1, 4):
            for n, es in ((4, 100.0), (16, (100.0 + last) / 2), (64, last)):
                rows.append(_edit_row(method=method, batch_size=batch_size, n_edits=n, ES=es, S=es, PS=95.0 + es / 100,
                                      NS=99.0 + (n == 64) * 0.5))
    return pd.DataFrame(rows)


def _downstream(models=("m",), unedited={"m": {"qa": 0.62, "facts": 0.9}}) -> pd.DataFrame:
    """A sequential downstream table: each model's unedited accuracy at n_edits 0, then falling."""
    rows = []
    for model in models:
        for method in ("rome", "memit"):
            for n in (0, 8, 32):
                for task, base in unedited[model].items():
                    rows.append({"experiment": "sequential", "model": model, "method": method, "batch_size": 1,
                                 "sample": 0, "n_edits": n, "task": task, "metric": "acc",
                                 "value": base - n * (0.01 if method == "rome" else 0.002), "stderr": 0.01,
                                 "n_items": 100, "error": np.nan})
    return pd.DataFrame(rows)


def _panels_by_ylabel(figure) -> dict[str, list]:
    panels: dict[str, list] = {}
    for axis in figure.axes:
        panels.setdefault(axis.get_ylabel(), []).append(axis)
    return panels


def _padded(lo: float, hi: float) -> tuple[float, float]:
    return lo - plotting.PAD * (hi - lo), hi + plotting.PAD * (hi - lo)


def _all_at(axes, limits: tuple[float, float]) -> bool:
    """Every axis in `axes` has exactly the y range `limits`."""
    return len(axes) > 0 and all(axis.get_ylim() == pytest.approx(limits) for axis in axes)


def _unedited_lines(axis) -> list:
    return [line for line in axis.get_lines() if line.get_label().startswith(plotting.UNEDITED)]


def test_every_panel_of_an_edit_metric_spans_its_full_range(drawn):
    plotting.sequential_figure(_sequential_edits(), "unused.png")
    (figure,) = drawn
    panels = _panels_by_ylabel(figure)
    assert set(panels) == {plotting.LABELS[m] for m in plotting.EDIT_METRICS}
    for label, axes in panels.items():
        assert len(axes) == 2  # one per method (row)
        # the 99.2 wiggle and the 60 collapse on the same 0..100 scale
        assert all(axis.get_ylim() == pytest.approx(_padded(0, 100)) for axis in axes), (label, [a.get_ylim() for a in axes])


def test_the_sweep_and_the_sensitivity_share_their_ranges_too(drawn):
    sweep = pd.DataFrame([_edit_row(experiment="layer_sweep", method=m, layers=str(layer), batch_size=1, n_edits=1,
                                    S=s, ES=s) for m, values in (("rome", (99.5, 99.9)), ("memit", (40.0, 97.0)))
                          for layer, s in enumerate(values)])
    plotting.layer_sweep_figure(sweep, "unused.png")
    grid = pd.DataFrame([{**_edit_row(experiment="sensitivity", method=m, batch_size=1, n_edits=1, ES=es),
                          "parameter": p, "value": v} for m, p, scale in (("memit", "mom2_update_weight", 100.0),
                                                                            ("alphaedit", "l2", 1.0))
                         for v, es in ((scale, 99.0), (10 * scale, 98.5 if m == "memit" else 20.0))])
    plotting.sensitivity_figure(grid, "unused.png")
    for figure in drawn:
        for axes in _panels_by_ylabel(figure).values():
            assert _all_at(axes, _padded(0, 100))


@pytest.mark.parametrize("name", ["sequential", "sensitivity", "downstream", "ablations"])
def test_every_panel_has_its_x_tick_labels(drawn, name):
    if name == "sequential":
        plotting.sequential_figure(_sequential_edits(), "unused.png")
    elif name == "sensitivity":
        grid = pd.DataFrame([{**_edit_row(experiment="sensitivity", method=m, batch_size=1, n_edits=1), "parameter": "l2",
                              "value": v} for m in ("memit", "emmet") for v in (0.1, 1.0, 10.0)])
        plotting.sensitivity_figure(grid, "unused.png")
    elif name == "downstream":  # two models: two rows of panels
        plotting.downstream_figure(_downstream(("small", "large"), {"small": {"qa": 0.5}, "large": {"qa": 0.7}}),
                                   "unused.png")
    else:
        plotting.ablations_figure(ablation_tables(_downstream(), {"edited_layers": [{"shallow": "rome", "deep": "memit"}],
                                                                  "constraint": [{"with": "memit", "without": "rome"}]}),
                                  "unused.png")
    (figure,) = drawn
    assert len(figure.axes) >= 2 and len({axis.get_position().y0 for axis in figure.axes}) >= 2  # several rows
    for axis in figure.axes:
        labels = [label.get_text() for label in axis.get_xticklabels() if label.get_visible() and label.get_text()]
        assert len(labels) >= 2, (axis.get_title(), labels)
        assert axis.get_xlabel()


def test_downstream_draws_the_unedited_accuracy_on_a_shared_range(drawn):
    plotting.downstream_figure(_downstream(("small", "large"), {"small": {"qa": 0.62, "facts": 0.9},
                                                                "large": {"qa": 0.71, "facts": 0.95}}), "unused.png")
    (figure,) = drawn
    assert len(figure.axes) == 4  # rows: models, columns: tasks
    for axis in figure.axes:
        model, task = axis.get_title().split("\n")
        (line,) = _unedited_lines(axis)
        expected = {"small": {"qa": 0.62, "facts": 0.9}, "large": {"qa": 0.71, "facts": 0.95}}[model][task]
        assert line.get_label() == plotting.UNEDITED
        assert np.allclose(line.get_ydata(), expected)
        assert axis.get_ylim() == pytest.approx(_padded(0, 1))  # accuracies are proportions
    legend = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert plotting.UNEDITED in legend


def test_ablation_of_two_models_draws_each_models_unedited_accuracy(drawn):
    data = _downstream(("small", "large"), {"small": {"qa": 0.5}, "large": {"qa": 0.8}})
    plotting.ablations_figure(ablation_tables(data, {"model_size": [{"smaller": "small", "larger": "large"}]}), "unused.png")
    (figure,) = drawn
    for axis in figure.axes:  # one row per method: rome, memit
        lines = {line.get_label(): set(np.round(line.get_ydata(), 6)) for line in _unedited_lines(axis)}
        assert lines == {"unedited small": {0.5}, "unedited large": {0.8}}
    legend = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert {"unedited small", "unedited large"} <= set(legend)


def test_no_unedited_line_is_made_up_for_the_edit_tables(drawn):
    """edits.csv holds no row of the unedited model: its figures draw no reference line."""
    plotting.sequential_figure(_sequential_edits(), "unused.png")
    (figure,) = drawn
    assert not [line for axis in figure.axes for line in _unedited_lines(axis)]


def test_configured_limits_replace_the_full_range_and_warn_when_they_cut(drawn):
    with pytest.warns(UserWarning, match=r"figures\.y_limits\.ES \[90\.0, 100\.0\]: sequential has values from 60"):
        plotting.sequential_figure(_sequential_edits(), "unused.png", y_limits={"ES": [90, 100]})
    plotting.downstream_figure(_downstream(), "unused.png", y_limits={"accuracy": [0.2, 1.0]})
    plotting.single_edits_figure(pd.DataFrame([_edit_row(experiment="single", method="rome", batch_size=1, n_edits=1,
                                                         ES=99.0)]), "unused.png", y_limits={"ES": [50, 100]})
    sequential, downstream, single = drawn
    panels = _panels_by_ylabel(sequential)
    assert _all_at(panels[plotting.LABELS["ES"]], _padded(90, 100))
    assert _all_at(panels[plotting.LABELS["PS"]], _padded(0, 100))
    assert _all_at(downstream.axes, _padded(0.2, 1.0))
    # single edits: the metric is on the x axis
    limits = {axis.get_xlabel(): axis.get_xlim() for axis in single.axes}
    assert limits[plotting.LABELS["ES"]] == pytest.approx(_padded(50, 100))
    assert limits[plotting.LABELS["S"]] == pytest.approx(_padded(0, 100))


def test_causal_trace_panels_share_one_range_configurable(drawn):
    traces = pd.DataFrame([{"model": model, "case_id": c, "kind": kind, "token": token, "layer": layer,
                            "effect": (0.5 if model == "a" else 0.05) * (layer == 1) + 0.01 * c}
                           for model in ("a", "b") for c in range(3) for kind in ("hidden", "mlp")
                           for token in ("subject_last", "last") for layer in range(3)])
    plotting.causal_trace_figure(traces, "unused.png")
    plotting.causal_trace_figure(traces, "unused.png", y_limits={"effect": [-0.1, 0.6]})
    free, configured = drawn
    assert len({axis.get_ylim() for axis in free.axes}) == 1
    assert _all_at(configured.axes, _padded(-0.1, 0.6))


def test_a_task_scored_by_matthews_correlation_spans_minus_one_to_one(drawn):
    data = _downstream()
    data.loc[data["task"] == "qa", "metric"] = "mcc"
    plotting.downstream_figure(data, "unused.png")
    (figure,) = drawn
    limits = {axis.get_title(): axis.get_ylim() for axis in figure.axes}
    assert limits == {"qa": pytest.approx(_padded(-1, 1)), "facts": pytest.approx(_padded(0, 1))}


def test_a_perplexity_task_gets_its_own_panel_and_range(drawn):
    """A lower-is-better task (lm-eval's word perplexity) is drawn in its own panel on the range its
    values need, also where figures.y_limits.accuracy fixes the accuracies' range."""
    accuracy = _downstream().assign(higher_is_better=True)
    perplexity = accuracy[accuracy["task"] == "qa"].assign(task="wiki", metric="word_perplexity", higher_is_better=False)
    perplexity = perplexity.assign(value=20 + 100 * (0.62 - perplexity["value"]), stderr=0.3)
    bits = perplexity.assign(metric="bits_per_byte", value=1.1)
    plotting.downstream_figure(pd.concat([accuracy, perplexity, bits]), "unused.png", y_limits={"accuracy": [0.2, 1.0]})
    (figure,) = drawn
    limits = {axis.get_title(): axis.get_ylim() for axis in figure.axes}
    assert set(limits) == {"qa", "facts", "wiki"}
    assert limits["qa"] == pytest.approx(_padded(0.2, 1.0))
    lo, hi = limits["wiki"]
    assert lo < 20 < 20 + 100 * 0.32 < hi < 60  # word perplexity 20 -> 52 (rome), not bits per byte
    labels = {axis.get_title(): axis.get_ylabel() for axis in figure.axes}
    assert labels == {"qa": "accuracy", "facts": "accuracy", "wiki": "word perplexity (lower is better)"}


@pytest.mark.parametrize("y_limits, message", [
    ({"ES": [100, 0]}, r"figures\.y_limits\.ES: \[100, 0\] must be \[lo, hi\] with lo < hi"),
    ({"ES": [5, 5]}, r"figures\.y_limits\.ES: \[5, 5\] must be"),
    ({"EX": [0, 100]}, r"figures\.y_limits\.EX: unknown metric"),
])
def test_bad_limits_are_refused_naming_the_config_field(tmp_path, y_limits, message):
    with pytest.raises(ValueError, match=message):
        plotting.write_figures({}, {}, y_limits=y_limits)


def test_the_schema_knows_exactly_the_metrics_plotting_ranges():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    assert set(schema["properties"]["figures"]["properties"]["y_limits"]["properties"]) == set(plotting.Y_LIMITS)
    defaults = {metric: span for metric, span in plotting.Y_LIMITS.items() if span is not None}
    for metric, span in defaults.items():  # each default is the one the schema's description states
        description = schema["properties"]["figures"]["properties"]["y_limits"]["properties"][metric]["description"]
        assert re.search(rf"default \[{span[0]:g}, {span[1]:g}\]", description), (metric, description)


def test_plotting_imports_without_torch():
    import subprocess
    import sys

    code = "import sys; import editlib.study.plotting; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
