"""Text corpora for second-moment statistics: local jsonl/txt files or a HF dataset.

Documents are sampled as the reference does (FixedRandomSubsetSampler): a random.Random(seed)
shuffle of all document indices, the first n kept.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path


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


def _read_hf(spec: str, text_field: str) -> list[str]:
    # spec: "hf:<path>[:<config>[:<split>]]", e.g. "hf:wikimedia/wikipedia:20231101.en:train"
    import datasets

    parts = spec[3:].split(":")
    path, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    return datasets.load_dataset(path, config, split=split)[text_field]


def load_corpus(spec: str, n_samples: int | None = None, seed: int = 1, text_field: str = "text") -> Corpus:
    """Load documents from a .jsonl/.txt path or "hf:path:config:split", sampled reproducibly."""
    texts = _read_hf(spec, text_field) if spec.startswith("hf:") else _read_local(Path(spec), text_field)
    indices = list(range(len(texts)))
    random.Random(seed).shuffle(indices)
    if n_samples is not None:
        indices = indices[:n_samples]
    chosen = tuple(texts[i] for i in indices)
    digest = hashlib.sha256()
    for text in chosen:
        digest.update(hashlib.sha256(text.encode()).digest())
    return Corpus(name=spec, texts=chosen, fingerprint=digest.hexdigest()[:16])
