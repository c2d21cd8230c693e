"""Keys k: inputs of the edited module at the subject's last token, averaged over context templates.

For N requests and T templates, row r = i * T + j holds template j applied to request i's prompt
(template 0 is the plain "{}"). One forward pass per chunk of rows reads every requested layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editlib.data.records import EditRequest
from editlib.model.hooks import capture_inputs, capture_outputs, run_until
from editlib.model.layout import ModelLayout
from editlib.model.tokens import PaddedBatch, pad_id, pad_right, prompt_ids, subject_last_indices


@dataclass
class ContextPrompts:
    """Token ids of every (request, template) prompt, optionally followed by per-request suffix ids."""

    ids: list[list[int]]
    subject_last: torch.Tensor  # (R,)
    fact: torch.Tensor  # (R,) request index of each row
    template: torch.Tensor  # (R,) template index of each row
    prompt_lengths: torch.Tensor  # (R,) tokens before the suffix
    n_facts: int
    n_templates: int


def build_context_prompts(
    tokenizer,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    suffixes: Sequence[Sequence[int]] | None = None,
    extra_prompts: Sequence[str] = (),
) -> ContextPrompts:
    """Rows for every request x (templates + extra_prompts); `suffixes[i]` is appended to request i's
    template rows (not to the extra prompts, which take the bare subject, e.g. "{} is a")."""
    texts, subjects, facts, kinds = [], [], [], []
    for i, request in enumerate(requests):
        for j, template in enumerate(templates):
            texts.append(template.format(request.prompt))
            subjects.append(request.subject)
            facts.append(i)
            kinds.append(j)
        for j, extra in enumerate(extra_prompts):
            texts.append(extra)
            subjects.append(request.subject)
            facts.append(i)
            kinds.append(len(templates) + j)
    filled = [text.replace("{}", subject) for text, subject in zip(texts, subjects)]
    ids = prompt_ids(tokenizer, filled)
    lengths = [len(x) for x in ids]
    if suffixes is not None:
        ids = [x + list(suffixes[f]) if k < len(templates) else x for x, f, k in zip(ids, facts, kinds)]
    return ContextPrompts(
        ids=ids,
        subject_last=torch.tensor(subject_last_indices(tokenizer, texts, subjects)),
        fact=torch.tensor(facts),
        template=torch.tensor(kinds),
        prompt_lengths=torch.tensor(lengths),
        n_facts=len(requests),
        n_templates=len(templates) + len(extra_prompts),
    )


def template_weights(n_templates: int, scheme: str) -> torch.Tensor:
    """Weights (T,) over templates: "memit" = 1/2 plain + 1/2 mean of prefixes; "uniform" = 1/T."""
    if scheme == "uniform" or n_templates == 1:
        return torch.full((n_templates,), 1.0 / n_templates)
    if scheme == "memit":
        weights = torch.full((n_templates,), 0.5 / (n_templates - 1))
        weights[0] = 0.5
        return weights
    raise ValueError(f"unknown key weighting {scheme!r} (expected 'memit' or 'uniform')")


def chunk_rows(n_rows: int, rows_per_chunk: int) -> list[slice]:
    return [slice(s, min(s + rows_per_chunk, n_rows)) for s in range(0, n_rows, rows_per_chunk)]


@torch.no_grad()
def read_at_subject(
    model,
    tokenizer,
    prompts: ContextPrompts,
    input_modules: Sequence[str] = (),
    output_modules: Sequence[str] = (),
    stop_after: str | None = None,
    rows_per_chunk: int = 128,
) -> dict[str, torch.Tensor]:
    """Inputs/outputs of the named modules at each row's subject-last token: name -> (R, width) fp32."""
    device = next(model.parameters()).device
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in (*input_modules, *output_modules)}
    with capture_inputs(model, input_modules) as inputs, capture_outputs(model, output_modules) as outputs:
        for part in chunk_rows(len(prompts.ids), rows_per_chunk):
            batch: PaddedBatch = pad_right(prompts.ids[part], pad_id(tokenizer)).to(device)
            run_until(model, stop_after, input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            index = torch.arange(batch.input_ids.shape[0], device=device)
            position = prompts.subject_last[part].to(device)
            for name in input_modules:
                rows[name].append(inputs[name][index, position].float())
            for name in output_modules:
                rows[name].append(outputs[name][index, position].float())
    return {name: torch.cat(parts) for name, parts in rows.items()}


def average_over_templates(per_row: torch.Tensor, prompts: ContextPrompts, weights: torch.Tensor) -> torch.Tensor:
    """(R, w) rows -> (w, N) per-fact weighted averages (rows are fact-major)."""
    grid = per_row.reshape(prompts.n_facts, prompts.n_templates, -1)  # (N, T, w)
    return torch.einsum("ntw,t->wn", grid, weights.to(grid))


def plain_rows(per_row: torch.Tensor, prompts: ContextPrompts) -> torch.Tensor:
    """(R, w) rows -> (w, N) values of the plain "{}" template (template 0)."""
    return per_row.reshape(prompts.n_facts, prompts.n_templates, -1)[:, 0, :].T


def layer_of(module_name: str) -> int:
    """The layer index in a module name such as "model.layers.5.mlp"."""
    match = re.search(r"\.(\d+)(?:\.|$)", module_name)
    if match is None:
        raise ValueError(f"no layer index in module name {module_name!r}")
    return int(match.group(1))


def compute_keys(
    model,
    tokenizer,
    layout: ModelLayout,
    layers: Sequence[int],
    prompts: ContextPrompts,
    scheme: str = "memit",
    output_modules: Sequence[str] = (),
    rows_per_chunk: int = 128,
) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """Averaged keys per layer, {layer: K (d_k, N)}, and plain-prompt outputs {name: (d, N)}.

    The forward stops after the deepest module needed.
    """
    names = [layout.rewrite(layer) for layer in layers]
    involved = list(layers) + [layer_of(name) for name in output_modules]
    stop_after = layout.block(max(involved)) if involved else None
    read = read_at_subject(model, tokenizer, prompts, names, output_modules, stop_after, rows_per_chunk)
    weights = template_weights(prompts.n_templates, scheme)
    keys = {layer: average_over_templates(read[layout.rewrite(layer)], prompts, weights) for layer in layers}
    outputs = {name: plain_rows(read[name], prompts) for name in output_modules}
    return keys, outputs
