"""Tokenization the way every editor and metric here needs it.

- Sequences are prompt ids (with the tokenizer's BOS, if it adds one) followed by target ids;
  batches are right padded (all indices are absolute, as the reference code assumes).
- The subject-last index is computed cumulatively, len(enc(prefix + subject)) - 1, which is
  BOS-safe and merge-safe (the reference MEMIT/ROME code tokenised the pieces separately and is
  off by one on BOS-adding tokenizers such as Llama-3's).
- Target ids are the tokens of " " + target with no special tokens (a BOS inside a target is
  the EasyEdit #247 bug).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class TokenizationError(ValueError):
    """A prompt, subject or target cannot be tokenised as the editors require."""


def target_text(target: str) -> str:
    """The target as scored: with one leading space, as in the reference code."""
    return target if target.startswith(" ") else " " + target


def target_ids(tokenizer, targets: Sequence[str]) -> list[list[int]]:
    """Token ids of " " + target for each target, never containing BOS."""
    if not targets:
        return []
    encoded = tokenizer([target_text(t) for t in targets], add_special_tokens=False)["input_ids"]
    special = {tokenizer.bos_token_id, getattr(tokenizer, "unk_token_id", None)} - {None}
    result = []
    for target, ids in zip(targets, encoded):
        while ids and ids[0] in special:
            ids = ids[1:]
        if not ids or not target.strip():
            raise TokenizationError(f"target {target!r} is empty after tokenisation")
        result.append(ids)
    return result


def prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt text, with the tokenizer's own special tokens (BOS)."""
    return tokenizer(list(texts))["input_ids"]


def subject_last_indices(tokenizer, templates: Sequence[str], subjects: Sequence[str]) -> list[int]:
    """Index of the subject's last token in tokenizer(template.format(subject)), per pair.

    Cumulative method: prefix = template up to "{}"; index = len(enc(prefix + subject)) - 1.
    """
    if len(templates) != len(subjects):
        raise ValueError("templates and subjects differ in length")
    heads = []
    for template, subject in zip(templates, subjects):
        if template.count("{}") != 1:
            raise TokenizationError(f"prompt template must contain exactly one '{{}}': {template!r}")
        if not subject:
            raise TokenizationError(f"empty subject for prompt {template!r}")
        heads.append(template[: template.index("{}")] + subject)
    lengths = [len(ids) for ids in tokenizer(heads)["input_ids"]]
    return [length - 1 for length in lengths]


@dataclass
class PaddedBatch:
    """Right-padded token ids. input_ids, attention_mask: (B, T); lengths: (B,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> "PaddedBatch":
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> PaddedBatch:
    """Right-pad id lists into a batch."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return PaddedBatch(input_ids, attention_mask, lengths)


def ragged_index(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows holding `lens` items each (e.g. target tokens): every item's row and its index in
    its row, in row order."""
    row = torch.arange(len(lens), device=lens.device).repeat_interleave(lens)
    offset = torch.arange(int(lens.sum()), device=lens.device) - (torch.cumsum(lens, 0) - lens).repeat_interleave(lens)
    return row, offset


def pad_id(tokenizer) -> int:
    """The id used for padding (pad, else EOS, else 0)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def length_sorted_chunks(lengths: Sequence[int], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Group indices into chunks of similar length (longest first), bounded in rows and padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        too_many_tokens = max_tokens is not None and (len(current) + 1) * width > max_tokens
        if current and (len(current) >= max_rows or too_many_tokens):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------------------- teacher-forced target batches


@dataclass
class TargetBatch:
    """Right-padded prompt+target sequences. labels[b, p] is the token that logits[b, p] must
    predict (a target token), else -100. All tensors (B, T) except prompt_lengths (B,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: torch.Tensor

    @property
    def last_prompt_positions(self) -> torch.Tensor:
        """(B,) index of each row's last prompt token (predicts the first target token)."""
        return self.prompt_lengths - 1

    def to(self, device) -> "TargetBatch":
        return TargetBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.prompt_lengths)))


def target_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> TargetBatch:
    """Tokenise prompt texts (with BOS) and " " + target (no specials) into one right-padded batch."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    prompts_ids = prompt_ids(tokenizer, prompts)
    targets_ids = target_ids(tokenizer, targets)
    batch = pad_right([p + t for p, t in zip(prompts_ids, targets_ids)], pad_id(tokenizer))
    labels = torch.full_like(batch.input_ids, -100)
    for row, (p, t) in enumerate(zip(prompts_ids, targets_ids)):
        labels[row, len(p) - 1 : len(p) + len(t) - 1] = torch.as_tensor(t)
    prompt_lengths = torch.tensor([len(p) for p in prompts_ids])
    return TargetBatch(batch.input_ids, batch.attention_mask, labels, prompt_lengths)


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean negative log-likelihood of each row's target tokens. logits: (B, T, V)."""
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T)
    counts = (labels != -100).sum(1).clamp(min=1)
    return token_nll.sum(1) / counts


def target_argmax_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) True where every target token is the teacher-forced argmax (greedy decoding succeeds)."""
    hit = (logits.argmax(-1) == labels) | (labels == -100)
    return hit.all(1)
