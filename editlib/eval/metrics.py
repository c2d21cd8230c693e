"""Edit metrics: CounterFact probability metrics, ZsRE token accuracy, generation entropy.

`edit_scores` scores a list of requests per prompt (CounterFact: NLL of the new and the true
object; ZsRE: token accuracy), `edit_metrics` turns either kind into ES/PS/NS/S with intervals.

Every (prompt, target) pair is scored as prompt ids (with BOS) + target ids (" " + target, never a
BOS), so the first scored token is the target's first token on Llama-3 tokenizers too (the UME
code scores the BOS there). Pairs from many records go through few right-padded passes, sorted
by length; logits are computed only at target positions. A prompt scored with several targets
(CounterFact: the new and the true object) runs once, into a key/value cache; every target's
first token is scored at the prompt's last position and only the longer targets continue from
the cache (`share_prompts`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from editlib.data.records import EditRequest, batches, record_kind
from editlib.model.forward import continuation_exact, final_hidden, final_hidden_after, prefix_key_values
from editlib.model.layout import lm_head
from editlib.model.tokens import length_sorted_chunks, pad_id, pad_right, prompt_ids, ragged_index, target_ids


@torch.no_grad()
def teacher_forced(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], max_rows: int = 64,
                   share_prompts: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per pair: the NLL of each target token given the prompt and the earlier target tokens, and
    whether that token is the argmax.

    With `share_prompts`, each distinct prompt runs once (into a key/value cache; length-sorted
    chunks of `max_rows` prompts): the first token of each of its targets is scored at its last
    position, and only targets of two or more tokens continue from the cache;
    otherwise one right-padded pass over prompt + target per length-sorted chunk of `max_rows`
    pairs. Both give the same numbers up to float rounding; scoring that must see whole rows
    (GRACE's prompt queries) uses the latter.
    """
    return teacher_forced_ids(model, prompt_ids(tokenizer, prompts), target_ids(tokenizer, targets), pad_id(tokenizer),
                              max_rows, share_prompts=share_prompts)


@torch.no_grad()
def teacher_forced_ids(model, p_ids: Sequence[Sequence[int]], t_ids: Sequence[Sequence[int]], pad: int,
                       max_rows: int = 64, share_prompts: bool = True
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`teacher_forced` on token ids: prompts `p_ids` (BOS included where the model wants one),
    targets `t_ids` (non-empty), `pad` the padding id; chunks hold at most `max_rows` rows (distinct
    prompts when shared)."""
    p_ids, t_ids = [list(p) for p in p_ids], [list(t) for t in t_ids]
    if not p_ids:
        return [], []
    longest = max(len(p) for p in p_ids) + max(len(t) for t in t_ids)
    if share_prompts and continuation_exact(model, longest):
        return _teacher_forced_shared(model, p_ids, t_ids, max_rows, pad)
    device = next(model.parameters()).device
    sequences = [p + t for p, t in zip(p_ids, t_ids)]
    nlls: list[np.ndarray] = [np.zeros(0)] * len(sequences)
    hits: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(sequences)
    head = lm_head(model)
    for chunk in length_sorted_chunks([len(s) for s in sequences], max_rows=max_rows):
        batch = pad_right([sequences[i] for i in chunk], pad).to(device)
        hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
        lens = torch.tensor([len(t_ids[i]) for i in chunk], device=device)
        starts = torch.tensor([len(p_ids[i]) - 1 for i in chunk], device=device)
        row, offset = ragged_index(lens)
        pos = starts[row] + offset  # position p scores token p + 1
        _score_targets(head, hidden[row, pos], batch.input_ids[row, pos + 1], lens, chunk, nlls, hits)
    return nlls, hits


def _score_targets(head, hidden: torch.Tensor, labels: torch.Tensor, lens: torch.Tensor, pairs: Sequence[int],
                   nlls: list, hits: list) -> None:
    """Per-token NLL and argmax hit of `labels` from the hidden states that predict them, split into
    the pairs' targets (`lens` tokens each) and stored at the pairs' indices."""
    logits = head(hidden).float()
    token_nll = -torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    token_hit = logits.argmax(-1) == labels
    splits = lens.tolist()
    for pair, nll, hit in zip(pairs, token_nll.cpu().split(splits), token_hit.cpu().split(splits)):
        nlls[pair], hits[pair] = nll.numpy(), hit.numpy()


def _teacher_forced_shared(model, p_ids: list[list[int]], t_ids: list[list[int]], max_rows: int, pad: int
                           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`teacher_forced` with each distinct prompt run once into a key/value cache."""
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(p), len(distinct)) for p in p_ids]
    prompts = list(distinct)
    pairs_of: list[list[int]] = [[] for _ in prompts]
    for pair, prompt in enumerate(owner):
        pairs_of[prompt].append(pair)
    nlls: list[np.ndarray] = [np.zeros(0)] * len(p_ids)
    hits: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(p_ids)
    head = lm_head(model)
    for chunk in length_sorted_chunks([len(p) for p in prompts], max_rows=max_rows):
        batch = pad_right([list(prompts[u]) for u in chunk], pad).to(device)
        cache, prompt_hidden = prefix_key_values(model, batch.input_ids, return_hidden=True)
        lengths = batch.attention_mask.sum(1)
        # every target's first token is scored at its prompt's last position
        hidden = [prompt_hidden[torch.arange(len(chunk), device=device), lengths - 1]]
        pairs = [pair for u in chunk for pair in pairs_of[u]]
        row_prompt = torch.tensor([k for k, u in enumerate(chunk) for _ in pairs_of[u]], device=device)
        lens = torch.tensor([len(t_ids[pair]) for pair in pairs], device=device)
        row, offset = ragged_index(lens)
        source = row_prompt[row]  # index into the stacked hidden states of the token's scoring position
        longer = (lens > 1).nonzero().squeeze(1)
        if len(longer):  # the rest continue from the cache: target token j is scored at position j - 1
            rest = pad_right([t_ids[pairs[i]][:-1] for i in longer.tolist()], pad).to(device)
            prompt_of = row_prompt[longer]
            position_ids = lengths[prompt_of][:, None] + torch.arange(rest.input_ids.shape[1], device=device)
            cached = [tuple(t.index_select(0, prompt_of) for t in layer) for layer in cache]
            continued = final_hidden_after(model, cached, batch.attention_mask.index_select(0, prompt_of),
                                           rest.input_ids, rest.attention_mask, position_ids)
            hidden.append(continued.flatten(0, 1))
            row_in_rest = torch.full((len(pairs),), -1, device=device)
            row_in_rest[longer] = torch.arange(len(longer), device=device)
            later = offset > 0
            source[later] = (len(chunk) + row_in_rest[row[later]] * rest.input_ids.shape[1] + offset[later] - 1)
        labels = torch.tensor([token for pair in pairs for token in t_ids[pair]], device=device)
        _score_targets(head, torch.cat(hidden)[source], labels, lens, pairs, nlls, hits)
    return nlls, hits


def score_continuations(
    model, tokenizer, prompts: Sequence[str], targets: Sequence[str], max_rows: int = 64, share_prompts: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: mean NLL of the target tokens given the prompt, and whether every target token is
    the argmax under teacher forcing (`teacher_forced`)."""
    nlls, hits = teacher_forced(model, tokenizer, prompts, targets, max_rows, share_prompts)
    return np.array([n.mean() for n in nlls]), np.array([bool(h.all()) for h in hits])


PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood")


def counterfact_scores(model, tokenizer, requests: Sequence[EditRequest], max_rows: int = 64,
                       share_prompts: bool = True) -> pd.DataFrame:
    """Tidy per-prompt scores: case_id, kind, index, nll_new, nll_true (one row per prompt)."""
    meta, prompts, news, trues = [], [], [], []
    for request in requests:
        if request.target_true is None:
            raise ValueError(f"case_id={request.case_id}: CounterFact metrics need target_true")
        texts = {
            "rewrite": [request.text],
            "paraphrase": list(request.paraphrase_prompts),
            "neighborhood": list(request.neighborhood_prompts),
        }
        for kind in PROMPT_KINDS:
            for index, text in enumerate(texts[kind]):
                meta.append((request.case_id, kind, index))
                prompts.append(text)
                news.append(request.target_new)
                trues.append(request.target_true)
    nll, _ = score_continuations(model, tokenizer, prompts + prompts, news + trues, max_rows, share_prompts)
    frame = pd.DataFrame(meta, columns=["case_id", "kind", "index"])
    frame["nll_new"], frame["nll_true"] = nll[: len(prompts)], nll[len(prompts) :]
    return frame


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean, 0 if any value is 0 (scipy.stats.hmean convention for the S score)."""
    values = [float(v) for v in values]
    if any(math.isnan(v) for v in values):
        return float("nan")
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


CF_METRICS = ("ES", "PS", "NS", "EM", "PM", "NM")


def per_record_metrics(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per case_id: ES, PS, NS, EM, PM, NM (x100) of that record's prompts (NaN where a
    record has no prompt of a kind). From ZsRE scores (an `acc` column): ES, PS, NS are the token
    accuracies of the edit, paraphrase and neighbourhood prompts (efficacy, generalisation,
    specificity); EM, PM, NM are NaN."""
    if "acc" in scores.columns:
        per_kind = scores.groupby(["case_id", "kind"])["acc"].mean().unstack("kind")
        result = pd.DataFrame(index=per_kind.index)
        for name, kind in (("ES", "rewrite"), ("PS", "paraphrase"), ("NS", "neighborhood")):
            result[name] = 100.0 * per_kind[kind] if kind in per_kind.columns else np.nan
        for name in ("EM", "PM", "NM"):
            result[name] = np.nan
        return result
    frame = scores.assign(
        new_wins=(scores.nll_true > scores.nll_new).astype(float),
        true_wins=(scores.nll_true < scores.nll_new).astype(float),
        prob_gap=np.exp(-scores.nll_new) - np.exp(-scores.nll_true),
    )
    per_kind = frame.groupby(["case_id", "kind"])[["new_wins", "true_wins", "prob_gap"]].mean().unstack("kind")
    columns = {"ES": ("new_wins", "rewrite", 1.0), "PS": ("new_wins", "paraphrase", 1.0),
               "NS": ("true_wins", "neighborhood", 1.0), "EM": ("prob_gap", "rewrite", 1.0),
               "PM": ("prob_gap", "paraphrase", 1.0), "NM": ("prob_gap", "neighborhood", -1.0)}
    result = pd.DataFrame(index=per_kind.index)
    for name, (column, kind, sign) in columns.items():
        result[name] = 100.0 * sign * per_kind[(column, kind)] if (column, kind) in per_kind.columns else np.nan
    return result


def _hmean_rows(values: np.ndarray) -> np.ndarray:
    """Harmonic mean along the last axis (0 where any value is <= 0, NaN where any is NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        result = values.shape[-1] / (1.0 / values).sum(-1)
    result = np.where((values <= 0).any(-1), 0.0, result)
    return np.where(np.isnan(values).any(-1), np.nan, result)


def bootstrap_intervals(per_record: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each column's mean over records, resampling records with
    replacement (seeded), and of S = hmean(ES, PS, NS) on the same resamples."""
    values = per_record[list(CF_METRICS)].to_numpy(dtype=float)  # (n, 6)
    n = len(values)
    if n == 0 or n_boot < 1:
        return {name: (np.nan, np.nan) for name in (*CF_METRICS, "S")}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    with warnings.catch_warnings():  # an all-NaN column (no paraphrases) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values[draws], axis=1)  # (B, 6)
    s_values = _hmean_rows(means[:, :3])
    tail = 100 * (1 - level) / 2
    result = {}
    for j, name in enumerate(CF_METRICS):
        column = means[:, j]
        column = column[~np.isnan(column)]
        result[name] = tuple(np.percentile(column, [tail, 100 - tail])) if len(column) else (np.nan, np.nan)
    s_values = s_values[~np.isnan(s_values)]
    result["S"] = tuple(np.percentile(s_values, [tail, 100 - tail])) if len(s_values) else (np.nan, np.nan)
    return {k: (float(lo), float(hi)) for k, (lo, hi) in result.items()}


def edit_metrics(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """ES, PS, NS, EM, PM, NM (x100) averaged per record then over records, S = hmean(ES, PS, NS),
    and a 95% bootstrap interval over records for each (`<metric>_lo`, `<metric>_hi`); from
    CounterFact or ZsRE scores (per_record_metrics)."""
    per_record = per_record_metrics(scores)
    result = {}
    for name in CF_METRICS:
        column = per_record[name].dropna()
        result[name] = float(column.mean()) if len(column) else float("nan")
    result["S"] = harmonic_mean([result["ES"], result["PS"], result["NS"]])
    for name, (lo, hi) in bootstrap_intervals(per_record, n_boot, seed).items():
        result[f"{name}_lo"], result[f"{name}_hi"] = lo, hi
    return result


def zsre_scores(model, tokenizer, requests: Sequence[EditRequest], max_rows: int = 64,
                share_prompts: bool = True) -> pd.DataFrame:
    """Tidy per-prompt ZsRE scores: case_id, kind, index, acc (teacher-forced token accuracy of
    target_new on the edit and paraphrase prompts, of the neighbourhood answer on the
    neighbourhood prompts)."""
    meta, prompts, targets = [], [], []
    for request in requests:
        if len(request.neighborhood_answers) != len(request.neighborhood_prompts):
            raise ValueError(f"case_id={request.case_id}: ZsRE metrics need one answer per neighbourhood prompt")
        pairs = {
            "rewrite": [(request.text, request.target_new)],
            "paraphrase": [(text, request.target_new) for text in request.paraphrase_prompts],
            "neighborhood": list(zip(request.neighborhood_prompts, request.neighborhood_answers)),
        }
        for kind in PROMPT_KINDS:
            for index, (text, target) in enumerate(pairs[kind]):
                meta.append((request.case_id, kind, index))
                prompts.append(text)
                targets.append(target)
    _, hits = teacher_forced(model, tokenizer, prompts, targets, max_rows, share_prompts)
    frame = pd.DataFrame(meta, columns=["case_id", "kind", "index"])
    frame["acc"] = [float(hit.mean()) for hit in hits]
    return frame


def edit_scores(model, tokenizer, requests: Sequence[EditRequest], max_rows: int = 64,
                share_prompts: bool = True) -> pd.DataFrame:
    """Per-prompt scores of `requests`: counterfact_scores, or zsre_scores for ZsRE records."""
    score = zsre_scores if record_kind(requests) == "zsre" else counterfact_scores
    return score(model, tokenizer, requests, max_rows, share_prompts)


def zsre_metrics(model, tokenizer, requests: Sequence[EditRequest], max_rows: int = 64) -> dict[str, float]:
    """ZsRE teacher-forced token accuracy (x100): efficacy, paraphrase, specificity (vs the NQ answer)."""
    metrics = edit_metrics(zsre_scores(model, tokenizer, requests, max_rows), n_boot=0)
    return {"efficacy": metrics["ES"], "paraphrase": metrics["PS"], "specificity": metrics["NS"]}


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """MEMIT's generation entropy: arithmetic mean of weights[i] * H_{ns[i]} (bits) of the text's n-grams.

    Words are split on \\w+ / punctuation (nltk's word_tokenize in the reference).
    """
    words = _WORD.findall(text.lower())
    entropies = []
    for n in ns:
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        freqs = np.array(list(grams.values()), dtype=float) / max(total, 1)
        entropies.append(float(-(freqs * np.log2(freqs)).sum()) if total else 0.0)
    return float(np.mean(np.array(weights) * np.array(entropies)))


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100, top_k: int = 5,
                   seed: int = 0, batch_size: int = 16) -> list[str]:
    """Top-k sampled continuations (left-padded batches), returned with their prompts."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    config = GenerationConfig(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                              pad_token_id=pad_id(tokenizer))
    texts = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in batches(prompts, batch_size):
                enc = tokenizer(list(batch), return_tensors="pt", padding=True).to(device)
                out = model.generate(**enc, generation_config=config)
                texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return texts


def generation_entropy(model, tokenizer, requests: Sequence[EditRequest], max_new_tokens: int = 100, seed: int = 0) -> float:
    """GE (x100, as summarize.py reports it) over the records' generation prompts."""
    prompts = [p for r in requests for p in r.generation_prompts]
    if not prompts:
        return float("nan")
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    return 100.0 * float(np.mean([ngram_entropy(t) for t in texts]))
