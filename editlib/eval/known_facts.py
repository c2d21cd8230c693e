"""Which facts an unedited model already knows, by the criterion a caller needs.

``"greedy"`` (the stricter one, as the ``*_acc`` metrics): greedy decoding of the edit prompt
reproduces every token of " " + target_true (teacher forcing, one forward pass per batch); the
real-model tier keeps only such facts to edit. ``"probability"``: target_true has the lower mean
token NLL than target_new on the edit prompt (the CounterFact efficacy comparison, docs/methods.md
§6; pre-edit ES = 0). ``"first_token"``: the true object's first token is the model's greedy next
token; causal tracing follows a fact through that one prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from editlib.data.records import EditRequest

Criterion = Literal["greedy", "probability", "first_token"]
CRITERIA = ("greedy", "probability", "first_token")


def known_fact_mask(model, tokenizer, requests: Sequence[EditRequest], criterion: Criterion = "greedy",
                    batch_size: int = 16) -> list[bool]:
    """For each request, whether the unedited model already knows its fact by `criterion`.

    Every request needs its true object (CounterFact-style records). Scored by the edit metrics'
    own teacher forcing (`editlib.eval.metrics`).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if any(request.target_true is None for request in requests):
        raise ValueError("known-fact filtering needs target_true on every request (CounterFact-style records)")
    if not requests:
        return []
    from editlib.eval.metrics import score_continuations, teacher_forced

    prompts = [request.text for request in requests]
    trues = [request.target_true for request in requests]
    if criterion == "first_token":
        _, hits = teacher_forced(model, tokenizer, prompts, trues, batch_size)
        return [bool(hit[0]) for hit in hits]
    if criterion == "greedy":
        _, greedy = score_continuations(model, tokenizer, prompts, trues, max_rows=batch_size)
        return greedy.tolist()
    news = [request.target_new for request in requests]
    nll, _ = score_continuations(model, tokenizer, prompts + prompts, trues + news, max_rows=batch_size)
    return (nll[: len(requests)] < nll[len(requests) :]).tolist()


def known_facts(model, tokenizer, requests: Sequence[EditRequest], criterion: Criterion = "greedy",
                batch_size: int = 16) -> list[EditRequest]:
    """The requests whose fact the unedited model already knows (see `known_fact_mask`); requests
    without a true object (ZsRE records edited towards their answers) are left out."""
    requests = [request for request in requests if request.target_true is not None]
    mask = known_fact_mask(model, tokenizer, requests, criterion=criterion, batch_size=batch_size)
    return [request for request, known in zip(requests, mask) if known]
