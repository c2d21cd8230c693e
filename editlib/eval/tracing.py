"""Causal tracing (Meng et al. 2022, ROME section 2): which hidden states carry a known fact.

For a prompt "{subject} <relation>" whose true object o the model predicts:

- clean run: p_clean = P(o_1 | prompt), o_1 the first token of " " + o;
- corrupted runs: Gaussian noise of scale `noise_factor` x (std of the subject tokens' input
  embeddings) is added to the embedding of every subject token, `n_samples` draws per fact (the
  draws are seeded per fact and identical in every condition, so effects are paired);
  p_corrupted = P(o_1) averaged over the draws;
- restored runs: in the corrupted runs one state at one token is copied back from the clean run:
  `hidden` = the block output at one layer; `mlp` / `attn` = that sublayer's output at a window
  of `window` consecutive layers centred on the layer (window 1: that layer alone).

The indirect effect of a state is IE = p_restored - p_corrupted; its mean over facts (AIE) per
layer shows where the fact is read. States are traced at the subject's last token (where ROME,
MEMIT, EMMET and AlphaEdit write) and at the prompt's last token. The clean row of each fact
travels in the same batch as its corrupted rows, so restoring copies values of the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from editlib.data.records import EditRequest, batches
from editlib.model.forward import final_hidden
from editlib.model.hooks import _replace_tensor, _tensor_of
from editlib.model.layout import lm_head, model_layout
from editlib.model.tokens import pad_id, pad_right, prompt_ids, target_ids

KINDS = ("hidden", "mlp", "attn")
TOKENS = ("subject_last", "last")
TRACE_COLUMNS = ["case_id", "kind", "token", "layer", "p_clean", "p_corrupted", "p_restored", "effect"]


@dataclass(frozen=True)
class TracingConfig:
    """How facts are corrupted and which states are restored."""

    n_samples: int = 10
    noise_factor: float = 3.0
    window: int = 1
    kinds: tuple[str, ...] = KINDS
    tokens: tuple[str, ...] = TOKENS
    seed: int = 0
    facts_per_chunk: int = 16

    def __post_init__(self):
        if self.n_samples < 1 or self.window < 1 or self.facts_per_chunk < 1:
            raise ValueError("n_samples, window and facts_per_chunk must be >= 1")
        if self.noise_factor <= 0:
            raise ValueError(f"noise_factor must be > 0, got {self.noise_factor}")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown tracing kind {kind!r}; expected one of {KINDS}")
        for token in self.tokens:
            if token not in TOKENS:
                raise ValueError(f"unknown traced token {token!r}; expected one of {TOKENS}")


def subject_spans(tokenizer, templates: Sequence[str], subjects: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) token positions of the subject in tokenizer(template.format(subject)).

    Computed cumulatively like the subject-last index (BOS-safe); the prefix is tokenised without
    its trailing space, which byte-level BPE attaches to the subject's first token.
    """
    heads = [t[: t.index("{}")] for t in templates]
    starts = [len(ids) for ids in tokenizer([h.rstrip(" ") for h in heads])["input_ids"]]
    ends = [len(ids) for ids in tokenizer([h + s for h, s in zip(heads, subjects)])["input_ids"]]
    spans = list(zip(starts, ends))
    for (start, end), subject in zip(spans, subjects):
        if not start < end:
            raise ValueError(f"subject {subject!r} has no tokens of its own in its prompt")
    return spans


def _modules(layout, kind: str, layer: int) -> str:
    if kind == "hidden":
        return layout.block(layer)
    if kind == "mlp":
        return layout.mlp(layer)
    return layout.attn(layer)


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> list[int]:
    """Layers whose `kind` output is restored for the state at `layer` (a window for mlp/attn)."""
    if kind == "hidden" or window == 1:
        return [layer]
    start = max(0, layer - window // 2)
    return list(range(start, min(n_layers, start + window)))


def embedding_noise_scale(model, tokenizer, subjects: Sequence[str], factor: float) -> float:
    """factor x the standard deviation of all input-embedding entries of the subjects' tokens."""
    ids = [i for row in tokenizer([" " + s for s in subjects], add_special_tokens=False)["input_ids"] for i in row]
    with torch.no_grad():
        vectors = model.get_input_embeddings().weight[torch.tensor(ids)]
    return factor * float(vectors.float().std())


@torch.no_grad()
def trace_facts(model, tokenizer, requests: Sequence[EditRequest], config: TracingConfig = TracingConfig(),
                noise_scale: float | None = None, progress: bool = True) -> pd.DataFrame:
    """Per fact, kind, token and layer: p_clean, p_corrupted, p_restored and effect (TRACE_COLUMNS)."""
    if not requests:
        return pd.DataFrame(columns=TRACE_COLUMNS)
    layout = model_layout(model)
    if noise_scale is None:
        noise_scale = embedding_noise_scale(model, tokenizer, [r.subject for r in requests], config.noise_factor)
    frames = []
    chunks = list(batches(list(enumerate(requests)), config.facts_per_chunk))
    for chunk in tqdm(chunks, desc="causal tracing", disable=not progress):
        frames.append(_trace_chunk(model, tokenizer, layout, chunk, config, noise_scale))
    return pd.concat(frames, ignore_index=True)


def _trace_chunk(model, tokenizer, layout, chunk, config: TracingConfig, noise_scale: float) -> pd.DataFrame:
    device = next(model.parameters()).device
    indices, requests = [i for i, _ in chunk], [r for _, r in chunk]
    n_facts, copies = len(requests), 1 + config.n_samples
    ids = prompt_ids(tokenizer, [r.text for r in requests])
    spans = subject_spans(tokenizer, [r.prompt for r in requests], [r.subject for r in requests])
    answers = torch.tensor([t[0] for t in target_ids(tokenizer, [r.target_true for r in requests])], device=device)
    batch = pad_right([row for row in ids for _ in range(copies)], pad_id(tokenizer)).to(device)
    width, hidden_size = batch.input_ids.shape[1], model.config.hidden_size

    # noise (rows, T, d): zero on clean rows and outside the subject; one seeded draw per fact
    noise = torch.zeros(n_facts, copies, width, hidden_size)
    for f, (index, (start, end)) in enumerate(zip(indices, spans)):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        noise[f, 1:, start:end] = noise_scale * torch.randn(config.n_samples, end - start, hidden_size, generator=generator)
    noise = noise.reshape(n_facts * copies, width, hidden_size).to(device)
    rows = torch.arange(n_facts * copies, device=device)
    clean_row = rows - rows % copies
    last = batch.lengths.to(device) - 1
    positions = {"subject_last": torch.tensor([end - 1 for _, end in spans], device=device).repeat_interleave(copies),
                 "last": last}

    def corrupt(module, args, output):
        return output + noise.to(output.dtype)

    def run(restores: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """P(answer) per row with the named modules' outputs restored at the given positions."""
        handles = [model.get_input_embeddings().register_forward_hook(corrupt)]
        for name, position in restores:
            def restore(module, args, output, position=position):
                tensor = _tensor_of(output).clone()
                tensor[rows, position] = tensor[clean_row, position]
                return _replace_tensor(output, tensor)

            handles.append(model.get_submodule(name).register_forward_hook(restore))
        try:
            hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        logits = lm_head(model)(hidden[rows, last]).float()
        return torch.softmax(logits, -1)[rows, answers.repeat_interleave(copies)].reshape(n_facts, copies)

    base = run([])
    p_clean, p_corrupted = base[:, 0], base[:, 1:].mean(1)
    records = []
    for kind in config.kinds:
        for token in config.tokens:
            for layer in range(layout.n_layers):
                names = [_modules(layout, kind, l) for l in restored_layers(kind, layer, config.window, layout.n_layers)]
                p_restored = run([(name, positions[token]) for name in names])[:, 1:].mean(1)
                for f, request in enumerate(requests):
                    records.append((request.case_id, kind, token, layer, float(p_clean[f]), float(p_corrupted[f]),
                                    float(p_restored[f]), float(p_restored[f] - p_corrupted[f])))
    return pd.DataFrame(records, columns=TRACE_COLUMNS)
