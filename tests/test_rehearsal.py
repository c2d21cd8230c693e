"""The rehearsal's stand-ins (fast) and each paper config's rehearsal end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from editlib.data.records import load_requests
from editlib.model.architectures import HUB_ARCHITECTURES
from editlib.study.config import validate_config
from editlib.study.pipeline import state_points
from editlib.study.rehearsal import standins, tasks
from editlib.study.rehearsal.hub import LocalHub, hub_env
from editlib.study.rehearsal.run import REPO, local_url, read_yaml, rehearsal_config, rehearse, with_addresses
from editlib.study.stages import sequential_runs
from editlib.study.tables import read_results

PAPER_CONFIGS = ["llama3-8b.yaml", "llama2-7b.yaml", "llama2-7b-chat.yaml", "llama2-13b.yaml"]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def world():
    return standins.toy_world(n_subjects=40)


@pytest.fixture(scope="module")
def texts(world):
    return standins.tokenizer_texts(world)


# ---------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_override_changes_sizes_and_standin_settings_only(name, tmp_path):
    paper = read_yaml(REPO / "configs" / name)
    merged = with_addresses(rehearsal_config(REPO / "configs" / name), "http://127.0.0.1:8", tmp_path)
    validate_config(merged, SCHEMA, source=name)
    assert merged["model"]["device"] == "cpu" and merged["model"]["dtype"] == "float32"
    assert merged["model"]["path"] == paper["model"]["path"]
    # every method block, every experiment's method list and every ablation kept
    assert merged["methods"].keys() == paper["methods"].keys()
    for experiment, settings in paper["experiments"].items():
        assert merged["experiments"][experiment].get("methods") == settings.get("methods")
    assert merged.get("ablations") == paper.get("ablations")
    # the edited layers stay the paper's; the sweep's layers are a subset of the paper's
    for block, settings in paper["methods"].items():
        assert merged["methods"][block].get("layers") == settings.get("layers")
    assert set(merged["experiments"]["layer_sweep"]["layers"]) <= set(paper["experiments"]["layer_sweep"]["layers"])
    # the records' URLs keep their paths on the local server
    kind = paper["data"].get("records", "counterfact")
    assert merged["data"][kind] == "http://127.0.0.1:8" + paper["data"][kind].split("rome.baulab.info", 1)[1]
    assert merged["downstream"]["tasks"] == list(tasks.TASKS)
    assert merged["downstream"]["include_defaults"] == paper["downstream"]["include_defaults"]
    assert merged["stats"]["corpus"] == paper["stats"]["corpus"]


def test_local_url_keeps_path_and_query():
    assert local_url("https://rome.baulab.info/data/dsets/zsre_mem.json?x=1", "http://127.0.0.1:4000") == (
        "http://127.0.0.1:4000/data/dsets/zsre_mem.json?x=1")


# ---------------------------------------------------------------------------- models and tokenizers


@pytest.mark.parametrize("hub_id", sorted(HUB_ARCHITECTURES))
def test_standin_architecture_is_the_hub_models_at_a_tiny_width(hub_id):
    real = HUB_ARCHITECTURES[hub_id]
    config = standins.standin_config(hub_id, vocab_size=500, bos_token_id=1, eos_token_id=2)
    for key in ("model_type", "architectures", "num_hidden_layers", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                "hidden_act", "max_position_embeddings"):
        assert config[key] == real[key], key
    assert config["num_attention_heads"] // config["num_key_value_heads"] == (
        real["num_attention_heads"] // real["num_key_value_heads"])
    assert config["hidden_size"] <= 64 and config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]


@pytest.mark.parametrize("hub_id", ["meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"])
def test_standin_tokenizer_keeps_the_family_conventions(hub_id, texts, tmp_path):
    from transformers import AutoTokenizer

    from editlib.model.loading import load_tokenizer

    standins.write_tokenizer(hub_id, texts, tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    llama3 = standins.family(hub_id) == "llama3"
    bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if llama3 else ("<s>", "</s>")
    assert saved["tokenizer_class"] == ("PreTrainedTokenizerFast" if llama3 else "LlamaTokenizer")
    assert (saved["bos_token"], saved["eos_token"]) == (bos, eos)
    for tokenizer in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        assert tokenizer.pad_token is None
        assert (tokenizer.bos_token, tokenizer.eos_token) == (bos, eos)
        for text in ["The mother tongue of Danielle Darrieux is", "Ünïcødé ✓ text"]:
            ids = tokenizer(text)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
            assert tokenizer.eos_token_id not in ids
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
        pieces = tokenizer.convert_ids_to_tokens(tokenizer("Paris is", add_special_tokens=False)["input_ids"])
        if llama3:
            assert "Ġis" in pieces or any(p.startswith("Ġ") for p in pieces)
        else:
            assert pieces[0].startswith("▁") and any(p.startswith("▁") for p in pieces[1:])
            # byte fallback: an unseen character becomes its UTF-8 bytes
            assert "<0xE2>" in tokenizer.convert_ids_to_tokens(tokenizer("✓", add_special_tokens=False)["input_ids"])
    if hub_id.endswith("-chat-hf"):
        assert "[INST]" in saved["chat_template"]


# ---------------------------------------------------------------------------- records


def test_records_have_the_public_formats(world, tmp_path):
    counterfact, zsre = standins.counterfact_json(world), standins.zsre_json(world)
    assert list(counterfact[0]) == ["case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts",
                                    "neighborhood_prompts", "attribute_prompts", "generation_prompts"]
    assert list(counterfact[0]["requested_rewrite"]) == ["prompt", "relation_id", "target_new", "target_true", "subject"]
    assert set(counterfact[0]["requested_rewrite"]["target_new"]) == {"str", "id"}
    assert list(zsre[0]) == ["subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond"]
    for name, records, kind in (("counterfact.json", counterfact, "counterfact"), ("zsre_mem.json", zsre, "zsre")):
        (tmp_path / name).write_text(json.dumps(records))
        assert len(load_requests(tmp_path / name, kind=kind)) == len(records)


@pytest.mark.parametrize("kind", ["counterfact", "zsre"])
def test_known_to_makes_the_random_model_know_facts_for_tracing(kind, world, texts, tmp_path):
    import torch

    from editlib.data.records import parse_records
    from editlib.eval.known_facts import known_facts
    from editlib.model.loading import load_model

    torch.set_num_threads(1)
    standins.write_model_repo("meta-llama/Meta-Llama-3-8B", tmp_path, texts)
    records = (standins.counterfact_json if kind == "counterfact" else standins.zsre_json)(world)[:12]
    model, tokenizer = load_model(str(tmp_path))
    before = known_facts(model, tokenizer, parse_records(records, kind=kind, zsre_target="alt"), "first_token", 64)
    rewritten = standins.known_to(tmp_path, records, kind)
    after = known_facts(model, tokenizer, parse_records(rewritten, kind=kind, zsre_target="alt"), "first_token", 64)
    assert len(after) > len(before) and len(after) >= 2
    for old, new in zip(records, rewritten, strict=True):
        assert list(old) == list(new)  # the format is kept
        if kind == "zsre":
            assert new["alt"] == old["alt"] and new["answers"][0] != new["alt"] and new["pred"] == new["answers"][0]
        else:
            rewrite = new["requested_rewrite"]
            assert rewrite["target_new"] == old["requested_rewrite"]["target_new"]
            assert rewrite["target_true"]["str"] != rewrite["target_new"]["str"]


# ---------------------------------------------------------------------------- the local hub

_STREAM = """
import json, sys
import datasets
rows = datasets.load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
print(json.dumps([row for row in rows]))
"""


def test_local_hub_streams_the_wikipedia_standin_through_datasets(world, tmp_path):
    expected = standins.write_wikipedia_repo(tmp_path / "hub" / "datasets" / standins.WIKIPEDIA_REPO, world, shards=2)
    with LocalHub(tmp_path / "hub") as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | hub_env(hub.url, tmp_path / "cache")
        done = subprocess.run([sys.executable, "-c", _STREAM], env=env, capture_output=True, text=True, timeout=300)
        requests = list(hub.requests)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert rows == expected  # every row, both shards, in order, with exactly the dump's columns
    assert list(rows[0]) == list(standins.WIKIPEDIA_COLUMNS)
    parquet = [path for method, path, status in requests if path.endswith(".parquet") and status in (200, 206)]
    assert len({path.split("/")[-1] for path in parquet}) == 2


@pytest.mark.parametrize("pinned", [None, "0123456789abcdef0123456789abcdef01234567"])
def test_local_hub_serves_a_model_repo_to_snapshot_download(pinned, texts, tmp_path):
    hub_id = "meta-llama/Llama-2-7b-hf"
    repo = tmp_path / "hub" / "models" / hub_id
    standins.write_tokenizer(hub_id, texts, repo)
    (repo / "config.json").write_text(json.dumps(standins.standin_config(hub_id, 300, 1, 2)))
    script = ("import sys; from huggingface_hub import snapshot_download; "
              f"print(snapshot_download({hub_id!r}, revision={pinned or 'main'!r}))")
    with LocalHub(tmp_path / "hub", commits={("models", hub_id): pinned} if pinned else None) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | hub_env(hub.url, tmp_path / "cache")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        commit = hub.commit("models", hub_id)
    assert done.returncode == 0, done.stderr[-3000:]
    snapshot = Path(done.stdout.strip().splitlines()[-1])
    cache = tmp_path / "cache" / "hub" / "models--meta-llama--Llama-2-7b-hf"
    assert snapshot == cache / "snapshots" / commit
    if pinned:
        assert commit == pinned
    else:
        assert (cache / "refs" / "main").read_text() == commit
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in repo.iterdir())


def test_local_hub_answers_unknown_repos_revisions_and_files_as_the_hub_does(tmp_path):
    import urllib.error
    import urllib.request

    (tmp_path / "hub" / "models" / "a" / "b").mkdir(parents=True)
    (tmp_path / "hub" / "models" / "a" / "b" / "x.txt").write_text("hello")
    with LocalHub(tmp_path / "hub") as hub:
        def status(path, headers=None):
            try:
                with urllib.request.urlopen(urllib.request.Request(hub.url + path, headers=headers or {})) as r:
                    return r.status, r.headers.get("X-Error-Code"), r.read()
            except urllib.error.HTTPError as err:
                return err.code, err.headers.get("X-Error-Code"), b""

        assert status("/a/b/resolve/main/x.txt") == (200, None, b"hello")
        assert status("/a/b/resolve/main/x.txt", {"Range": "bytes=1-3"}) == (206, None, b"ell")
        assert status("/a/b/resolve/main/y.txt")[:2] == (404, "EntryNotFound")
        assert status("/a/c/resolve/main/x.txt")[:2] == (404, "RepoNotFound")
        assert status("/api/models/a/b/revision/refs%2Fconvert%2Fparquet")[:2] == (404, "RevisionNotFound")
        assert status("/../etc/passwd")[0] == 404


# ---------------------------------------------------------------------------- end to end


def _check_tables(root: Path) -> None:
    config = yaml.safe_load((root / "config.yaml").read_text())
    results = root / "work" / "results" / config["run"]
    edits = pd.read_csv(results / "edits.csv")
    model = config["model"]["name"]
    runs = {(m, b, s) for m, b, s in sequential_runs(config)}
    sequential = edits[edits["experiment"] == "sequential"]
    assert {(m, b, s) for m, b, s in sequential[["method", "batch_size", "sample"]].itertuples(index=False)} == runs
    for experiment in ("single", "batched"):
        assert set(edits[edits["experiment"] == experiment]["method"]) == set(config["experiments"][experiment]["methods"])
    assert set(edits["model"]) == {model}
    downstream = pd.read_csv(results / "downstream.csv")
    for (method, batch_size, sample) in runs:
        rows = downstream[(downstream["experiment"] == "sequential") & (downstream["method"] == method)
                          & (downstream["batch_size"] == batch_size) & (downstream["sample"] == sample)]
        # rows of every configured task at every state the run reached, the unedited model's included
        settings = config["experiments"]["sequential"]
        reached = {0, *state_points(settings["total_edits"], batch_size, settings["downstream_at"])}
        assert set(rows["n_edits"]) == reached, (method, batch_size, sample)
        for n_edits in reached:
            at = rows[rows["n_edits"] == n_edits]
            assert set(config["downstream"]["tasks"]) <= set(at["task"]), (method, batch_size, sample, n_edits)
    traces = read_results(results / "causal_trace.csv")
    assert traces["case_id"].nunique() == config["tracing"]["n_facts"]  # the stand-in model knows facts to trace
    assert (results / "findings.csv").is_file() and (root / "work" / "reports" / config["run"] / "findings.html").is_file()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["returncode"] == 0
    requests = (root / "hub_requests.tsv").read_text()
    assert "/datasets/wikimedia/wikipedia/resolve/" in requests and config["model"]["path"] in requests


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_rehearsal_runs_the_paper_configs_whole_workflow(name, tmp_path):
    root = tmp_path / "rehearsal"
    assert rehearse(REPO / "configs" / name, root=root, cores="2") == 0
    _check_tables(root)


# ---------------------------------------------------------------------------- the local tasks

_PASS_AT_1 = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("utils", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
tests = "assert times_3(2) == 6"
print(json.dumps([module.pass_at_1([tests], [["def times_3(x):\\n    return 3 * x"]]),
                  module.pass_at_1([tests], [["def times_3(x):\\n    return x"]])]))
"""


@pytest.mark.parametrize("allowed", [True, False])
def test_mbpp_standin_executes_code_only_when_allowed(allowed, tmp_path):
    names = tasks.write_tasks(tmp_path)
    assert names == list(tasks.TASKS)
    config = yaml.safe_load((tmp_path / "rehearsal_mbpp.yaml").read_text().replace("!function ", ""))
    assert config["unsafe_code"] is True and config["num_fewshot"] == 3
    env = {k: v for k, v in os.environ.items() if k != "HF_ALLOW_CODE_EVAL"} | ({"HF_ALLOW_CODE_EVAL": "1"} if allowed else {})
    done = subprocess.run([sys.executable, "-c", _PASS_AT_1, str(tmp_path / "rehearsal_mbpp_utils.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    if allowed:
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == [1.0, 0.0]
    else:
        assert done.returncode != 0 and "HF_ALLOW_CODE_EVAL" in done.stderr


def test_standin_tasks_are_indexed_by_lm_eval_as_groups_and_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    tasks.write_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(tasks.TASKS) <= set(manager.all_tasks)
    for group, subtasks in tasks.SUBTASKS.items():
        assert set(subtasks) <= set(manager.all_subtasks)
        if subtasks:
            assert group in manager.all_groups
