"""Context templates: "{}" plus short random prefixes sampled from the unedited model (docs/methods.md §2).

MEMIT/EMMET/AlphaEdit use length_counts ((10, 5),): 5 prefixes of up to 10 tokens, one per seed
word. ROME uses ((5, 10), (10, 10)): 21 templates. Unlike the reference (unseeded, and decoding
special tokens into the text, which puts a literal BOS in every Llama-3 template), sampling here
is seeded and skips special tokens; templates are cached on disk keyed by model content.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig

from editlib.editing.hparams import MEMIT_LENGTHS
from editlib.io import content_key, write_json
from editlib.model.loading import model_fingerprint

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


def clean_generated(text: str) -> str:
    """Normalise generated text as the reference does, and make it safe for str.format."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("\n", " ")
    return text.replace("{", " ").replace("}", " ")


@torch.no_grad()
def sample_texts(model, tokenizer, prompt: str, n: int, max_tokens: int, seed: int, top_k: int = 5) -> list[str]:
    """`n` top-k samples continuing `prompt`, at most `max_tokens` tokens counting the prompt's own
    (BOS excluded), decoded without special tokens."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    n_prompt = int(ids.shape[1]) - int(tokenizer.bos_token_id is not None and ids[0, 0] == tokenizer.bos_token_id)
    new_tokens = max(max_tokens - n_prompt, 1)
    config = GenerationConfig(
        do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def sample_context_templates(
    model,
    tokenizer,
    length_counts: Sequence[tuple[int, int]] = MEMIT_LENGTHS,
    seed: int = 0,
    seed_words: Sequence[str] = SEED_WORDS,
    top_k: int = 5,
) -> list[str]:
    """["{}"] followed by "<prefix>. {}" for each sampled prefix."""
    templates = ["{}"]
    for length_index, (max_tokens, count) in enumerate(length_counts):
        per_word = [count // len(seed_words) + (i < count % len(seed_words)) for i in range(len(seed_words))]
        for word_index, (word, n) in enumerate(zip(seed_words, per_word)):
            if n == 0:
                continue
            texts = sample_texts(model, tokenizer, word, n, max_tokens, seed + 1000 * length_index + word_index, top_k)
            templates.extend(clean_generated(text) + ". {}" for text in texts)
    return templates


def context_templates(
    model,
    tokenizer,
    length_counts: Sequence[tuple[int, int]] = MEMIT_LENGTHS,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """Context templates from cache (keyed by model content and settings) or freshly sampled."""
    if cache_dir is None:
        return sample_context_templates(model, tokenizer, length_counts, seed)
    key = content_key({"model": model_fingerprint(model), "lengths": [list(x) for x in length_counts], "seed": seed})
    path = Path(cache_dir) / f"context_templates.{key}.json"
    if path.exists():
        try:
            templates = json.loads(path.read_text(encoding="utf-8"))["templates"]
            if isinstance(templates, list) and templates and templates[0] == "{}":
                return templates
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    templates = sample_context_templates(model, tokenizer, length_counts, seed)
    write_json(path, {"key": key, "templates": templates})
    return templates
