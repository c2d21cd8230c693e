"""Whether a model's outputs have collapsed: its top-1 next-token predictions on fixed probe texts,
compared with the unedited model's and with each other.

Long sequential editing first erodes a model gradually, then breaks it (Gupta, Rao, Anumanchipalli
2024), and single "disabling" ROME edits break it at once (Gupta et al. 2024, "Rebuilding ROME").
`PredictionProbe` measures that after every edit at the cost of one forward pass over a few
thousand tokens:

- agreement: the fraction of probe positions whose top-1 next token is the unedited model's
  (1 before any edit). Positions where the text goes on with an object the run edits (`skip_next`:
  the first token of each edited fact's true and new object) are left out, so that edits that do
  only what they should keep it at 1: the toy world's texts state the very facts it edits, and
  after 1,200 sequential MEMIT edits 116 of its probe's 182 object positions had changed as asked,
  45% of all the disagreement;
- top_token_share: the fraction of probe positions predicting the single most frequent token (a
  model that emits one token everywhere has a share near 1).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from editlib.model.tokens import pad_id, pad_right


class PredictionProbe:
    """Top-1 next-token predictions of a model on `texts` (each cut to `max_length` tokens), with
    the predictions of the model it was built on (the unedited model) as the reference; positions
    whose next token in the text is one of `skip_next` are left out."""

    def __init__(self, model, tokenizer, texts: Sequence[str], max_length: int = 64, batch_size: int = 16,
                 skip_next: Collection[int] = ()):
        if not texts:
            raise ValueError("PredictionProbe: no probe texts")
        rows = [ids for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if len(ids) > 1]
        if not rows:
            raise ValueError("PredictionProbe: every probe text is shorter than two tokens")
        self.batches = [pad_right(rows[start:start + batch_size], pad_id(tokenizer))
                        for start in range(0, len(rows), batch_size)]
        skipped = torch.tensor(sorted(skip_next), dtype=torch.long)
        self.kept = [self._kept(batch, skipped) for batch in self.batches]
        self.n_positions = sum(int(kept.sum()) for kept in self.kept)
        if not self.n_positions:
            raise ValueError("PredictionProbe: every probe position is followed by a skipped token")
        self.reference = self.predictions(model)

    @staticmethod
    def _kept(batch, skipped: torch.Tensor) -> torch.Tensor:
        """The real positions of `batch` whose next token in the text is not in `skipped` (the last
        position of a text, which has none, is kept)."""
        following = torch.full_like(batch.input_ids, -1)
        following[:, :-1] = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -1)
        return batch.attention_mask.bool() & ~torch.isin(following, skipped)

    @torch.no_grad()
    def predictions(self, model) -> torch.Tensor:
        """Top-1 next token at every kept position of every probe text, concatenated (n_positions,)."""
        device = next(model.parameters()).device
        out = []
        for batch, kept in zip(self.batches, self.kept):
            batch = batch.to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            out.append(logits.argmax(-1)[kept.to(device)].cpu())
        return torch.cat(out)

    def __call__(self, model) -> dict[str, float]:
        predicted = self.predictions(model)
        share = torch.bincount(predicted).max().item() / predicted.numel()
        return {"agreement": float((predicted == self.reference).float().mean()), "top_token_share": float(share)}
