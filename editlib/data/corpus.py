"""Text corpora for second-moment statistics: local jsonl/txt files or a HF dataset.

A local corpus is sampled as the reference does (FixedRandomSubsetSampler): a
random.Random(seed) shuffle of all document indices, the first n kept.

A HF dataset ("hf:path:config:split") is streamed, never downloaded whole: `sample_stream`
keeps the n rows with the smallest seeded hash of their row index, in one pass with at most n
documents in memory. That is an exact uniform sample without replacement that needs no row
count. The workflow samples it in the prepare_data job (`write_corpus`), so the statistics job
reads the sample from corpus.jsonl (`read_prepared`).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from editlib.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A sampled list of documents and a content fingerprint of exactly those documents."""

    name: str
    texts: tuple[str, ...]
    fingerprint: str


def _read_local(path: Path, text_field: str) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {lineno}: invalid JSON: {err.msg}") from None
                if not isinstance(row.get(text_field), str):
                    raise ValueError(f"{path}: line {lineno}: missing string field {text_field!r}")
                texts.append(row[text_field])
        return texts
    # Plain text: documents separated by blank lines.
    return [doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """(path, config, split) of "hf:<path>[:<config>[:<split>]]" (split default "train"),
    e.g. "hf:wikimedia/wikipedia:20231101.en:train"."""
    if not spec.startswith("hf:") or len(spec) == 3:
        raise ValueError(f"corpus {spec!r}: expected hf:<path>[:<config>[:<split>]]")
    parts = spec[3:].split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"corpus {spec!r}: expected hf:<path>[:<config>[:<split>]]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def open_hf_stream(spec: str):
    """The streaming datasets.IterableDataset of `spec` (nothing is downloaded ahead)."""
    import datasets

    path, config, split = parse_hf_spec(spec)
    try:
        return datasets.load_dataset(path, config, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 (hub, network and format errors alike: say which dataset)
        raise RuntimeError(f"corpus {spec}: cannot open datasets.load_dataset({path!r}, {config!r}, split={split!r}, "
                           f"streaming=True): {type(err).__name__}: {err}. It needs the Hugging Face Hub (or "
                           "HF_ENDPOINT pointing at a mirror); or set stats.corpus to a local .jsonl/.txt file") from err


def row_priority(index: int, seed: int) -> int:
    """A seeded 64-bit hash of a row index: the sample is the n rows with the smallest."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, key=f"editlib-corpus:{seed}".encode())
    return int.from_bytes(digest.digest(), "little")


def sample_stream(rows: Iterable[dict], n: int, seed: int, text_field: str = "text", source: str = "corpus",
                  total: int | None = None, progress: bool = True) -> list[str]:
    """A uniform random sample of n documents (field `text_field` of each row) of `rows`, read once.

    Keeps the n rows with the smallest row_priority(index, seed) in a heap, so it holds at most
    n documents whatever the stream's length, and every n-subset is equally likely. Returned in
    priority order (itself a uniformly random order). Fewer than n rows: all of them, with a
    warning. `source` names the dataset in errors; `total` (rows, if known) sizes the progress bar.
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"{source}: the number of documents to sample must be >= 1, got {n}")
    heap: list[tuple[int, int, str]] = []  # (-priority, -index, text): heap[0] is the largest kept
    bar = tqdm(total=total, unit="doc", desc=f"sampling {n} documents of {source}", disable=not progress,
               mininterval=5)
    index = -1
    for row in rows:  # not enumerate: its reused result tuple would keep the previous row alive
        index += 1
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{source}: row {index} has no string field {text_field!r} (fields: {fields})")
        priority = row_priority(index, seed)
        if len(heap) < n:
            heapq.heappush(heap, (-priority, -index, text))
        elif (priority, index) < (-heap[0][0], -heap[0][1]):
            heapq.heapreplace(heap, (-priority, -index, text))
        del row, text
        bar.update()
    bar.close()
    if index + 1 < n:
        log.warning("%s has %d documents, fewer than the %d asked for; using all of them", source, index + 1, n)
    return [text for _, _, text in sorted(heap, reverse=True)]


def sample_hf(spec: str, n: int, seed: int, text_field: str = "text", progress: bool = True) -> "Corpus":
    """n documents of HF dataset `spec`, streamed and sampled by `sample_stream`."""
    dataset = open_hf_stream(spec)
    features = getattr(dataset, "features", None)
    if features is not None and text_field not in features:
        raise ValueError(f"corpus {spec}: the dataset has no text field {text_field!r} (columns: {sorted(features)})")
    total = None
    info = getattr(dataset, "info", None)
    split = parse_hf_spec(spec)[2]
    if info is not None and info.splits and split in info.splits:
        total = info.splits[split].num_examples or None
    return corpus_of(spec, sample_stream(dataset, n, seed, text_field, f"corpus {spec}", total, progress))


def corpus_of(name: str, texts: Sequence[str]) -> "Corpus":
    """A Corpus of exactly `texts` in this order, with their content fingerprint."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return Corpus(name=name, texts=tuple(texts), fingerprint=digest.hexdigest()[:16])


def write_corpus(path: str | Path, corpus: "Corpus") -> None:
    """Atomically write `corpus` as JSON lines {"text": ...}, in its order (read back by read_prepared)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for text in corpus.texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def read_prepared(path: str | Path, name: str) -> "Corpus":
    """The sample `write_corpus` wrote to `path`, every document in file order (no resampling),
    named `name` (the dataset it was sampled from)."""
    texts = _read_local(Path(path), "text")
    if not texts:
        raise ValueError(f"{path}: the prepared sample of {name} is empty; rerun the prepare_data rule "
                         f"(snakemake --forcerun prepare_data)")
    return corpus_of(name, texts)


def load_corpus(spec: str, n_samples: int | None = None, seed: int = 1, text_field: str = "text") -> Corpus:
    """Load documents from a .jsonl/.txt path, sampled reproducibly (see the module docstring),
    or n_samples documents streamed from "hf:path:config:split" (`sample_hf`)."""
    if spec.startswith("hf:"):
        if n_samples is None:
            raise ValueError(f"corpus {spec}: a streamed dataset needs n_samples (stats.n_samples)")
        return sample_hf(spec, n_samples, seed, text_field)
    texts = _read_local(Path(spec), text_field)
    indices = _shuffled_indices(len(texts), seed)
    if n_samples is not None:
        indices = indices[:n_samples]
    return corpus_of(spec, [texts[i] for i in indices])


def _shuffled_indices(n: int, seed: int) -> list[int]:
    indices = list(range(n))
    random.Random(seed).shuffle(indices)
    return indices


def held_out_texts(path: str | Path, n_used: int, seed: int, n: int, text_field: str = "text") -> list[str]:
    """`n` documents of the local corpus at `path` that `load_corpus(path, n_used, seed)` does not
    draw: the next `n` of the same seeded shuffle (fewer where the corpus ends first)."""
    texts = _read_local(Path(path), text_field)
    return [texts[i] for i in _shuffled_indices(len(texts), seed)[n_used:n_used + n]]
