"""Whether a model's outputs have collapsed: its top-1 next-token predictions on fixed probe texts,
compared with the unedited model's and with each other.

Long sequential editing first erodes a model gradually, then breaks it (Gupta, Rao, Anumanchipalli
2024), and single "disabling" ROME edits break it at once (Gupta et al. 2024, "Rebuilding ROME").
`PredictionProbe` measures that after every edit at the cost of one forward pass over a few
thousand tokens:

- agreement: the fraction of probe positions whose top-1 next token is the unedited model's
  (1 before any edit; an edit that does only what it should changes the few positions about its
  own fact);
- top_token_share: the fraction of probe positions predicting the single most frequent token (a
  model that emits one token everywhere has a share near 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editlib.model.tokens import pad_id, pad_right


class PredictionProbe:
    """Top-1 next-token predictions of a model on `texts` (each cut to `max_length` tokens), with
    the predictions of the model it was built on (the unedited model) as the reference."""

    def __init__(self, model, tokenizer, texts: Sequence[str], max_length: int = 64, batch_size: int = 16):
        if not texts:
            raise ValueError("PredictionProbe: no probe texts")
        rows = [ids for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if len(ids) > 1]
        if not rows:
            raise ValueError("PredictionProbe: every probe text is shorter than two tokens")
        self.batches = [pad_right(rows[start:start + batch_size], pad_id(tokenizer))
                        for start in range(0, len(rows), batch_size)]
        self.n_positions = sum(int(batch.lengths.sum()) for batch in self.batches)
        self.reference = self.predictions(model)

    @torch.no_grad()
    def predictions(self, model) -> torch.Tensor:
        """Top-1 next token at every real position of every probe text, concatenated (n_positions,)."""
        device = next(model.parameters()).device
        out = []
        for batch in self.batches:
            batch = batch.to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            out.append(logits.argmax(-1)[batch.attention_mask.bool()].cpu())
        return torch.cat(out)

    def __call__(self, model) -> dict[str, float]:
        predicted = self.predictions(model)
        share = torch.bincount(predicted).max().item() / predicted.numel()
        return {"agreement": float((predicted == self.reference).float().mean()), "top_token_share": float(share)}
