"""Target values z (MEMIT/EMMET/AlphaEdit, at a block output) and v* (ROME, at an MLP output).

Each fact i gets its own free vector delta_i (d,), added at its subject-last token in every one of
its prompts. The reference optimises facts one at a time; here many facts share each forward and
backward pass. The facts stay independent: the loss is a sum of per-fact losses, rows never mix,
and Adam is applied per fact with its own early stop, so the result equals the per-fact loop.

Per-fact loss (docs/methods.md §3): NLL of the target over the T template prompts, + kl_factor *
KL(P_cur || P_init) at the subject-last token of "{subject} is a", + weight_decay *
||delta|| / ||h_init||^2. Stop when the loss < early_stop_loss; the last iteration takes no step;
after each step delta is clamped to clamp_norm_factor * ||h_init||.

Tokens before a prompt's subject-last token do not depend on delta (causal attention), so with
`cache_prefix` they run once, into a key/value cache, and every Adam step runs only the rest of
each prompt: the subject-last token, the relation and the target tokens. The blocks below the
edited one cannot depend on delta either: they run at the first step only and are replayed after.
Models with grouped-query attention run it without copying keys and values per query head
(`editlib.model.attention`). On fp32 Llama models on CPU the blocks above the edited one run as
`editlib.model.upper_blocks` (hand-written backward). The output matrix and the loss
terms read from it are one function with a hand-written backward (`_TargetHead`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from editlib.data.records import EditRequest, batches
from editlib.editing.hparams import TargetHparams
from editlib.editing.keys import build_context_prompts
from editlib.model import upper_blocks
from editlib.model.attention import grouped_attention
from editlib.model.forward import continuation_exact, final_hidden_after, split_rows
from editlib.model.hooks import StopForward, capture_outputs, edit_output, replay_blocks_below, stop_forward_after
from editlib.model.layout import block_index, lm_head, model_layout
from editlib.model.tokens import pad_id, ragged_index, target_ids


@dataclass
class TargetResult:
    """values = h_init + delta, (d, N) fp32; per-fact final loss, NLL and number of Adam steps."""

    values: torch.Tensor
    h_init: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    steps: torch.Tensor


# below this many rows the output matrix runs row-major (hidden @ W^T): for a single fact's few
# rows the vocabulary-major product and its column-wise reductions are slower (docs/performance.md)
VOCAB_MAJOR_MIN_ROWS = 16


def _vocab_major(rows: int) -> bool:
    return rows >= VOCAB_MAJOR_MIN_ROWS


class _TargetHead(torch.autograd.Function):
    """The output matrix and the loss terms read from it, with a hand-written backward.

    `hidden` (n_tokens + n_kl, d): the target tokens' rows, then the KL rows. Returns the target
    tokens' log-probabilities (n_tokens,) at `labels`, KL(P || P_ref) per KL row (n_kl,) and the
    KL rows' log-probabilities (n_kl, V) (no gradient; the reference at the first step). One pass
    over the vocabulary for the softmax; the backward reuses its buffer for the logits' gradient.
    From `VOCAB_MAJOR_MIN_ROWS` rows on, the logits are laid out vocabulary-major, (V, n) = W @
    hidden^T: with the long vocabulary axis as the product's rows, BLAS runs these products at
    about its full rate, where hidden @ W^T for a few hundred rows runs at about half of it; below
    it, row-major (n, V). Either way the loss terms read an (n, V) view.
    `logits`: a buffer of the logits' dtype from `logits_buffer` (None: a new one), so that the
    steps of one chunk reuse the same memory.
    """

    @staticmethod
    def logits_buffer(weight: torch.Tensor, rows: int) -> torch.Tensor:
        """An uninitialised logits buffer for `rows` rows, in the layout `forward` uses for them."""
        vocab = weight.shape[0]
        return weight.new_empty((vocab, rows) if _vocab_major(rows) else (rows, vocab))

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, reference, logits=None):
        n_tokens, vocab_major = len(labels), _vocab_major(len(hidden))
        left, right = (weight, hidden.T) if vocab_major else (hidden, weight.T)
        reuse = (logits is not None and logits.dtype == hidden.dtype == weight.dtype
                 and logits.shape == (left.shape[0], right.shape[1]))
        buffer = torch.mm(left, right, out=logits) if reuse else left @ right
        buffer = buffer.to(torch.promote_types(buffer.dtype, torch.float32))  # half precision: fp32
        shifted = buffer.T if vocab_major else buffer  # (n, V) either way
        if bias is not None:
            shifted += bias
        shifted -= shifted.amax(-1, keepdim=True)
        token_shifted = shifted[torch.arange(n_tokens, device=labels.device), labels]
        kl_shifted = shifted[n_tokens:].clone(memory_format=torch.contiguous_format)  # (n_kl, V), a copy
        exp = shifted.exp_()  # the logits' buffer, reused; probabilities = exp / total
        total = exp.sum(-1)
        log_total = total.log()
        token_logp = token_shifted - log_total[:n_tokens]
        kl_logp = kl_shifted - log_total[n_tokens:, None]
        excess = kl_logp - (kl_logp if reference is None else reference)
        kl = (kl_logp.exp() * excess).sum(-1)
        ctx.weight, ctx.labels, ctx.exp, ctx.total, ctx.excess, ctx.kl = weight, labels, exp, total, excess, kl
        ctx.exp_version = exp._version
        ctx.weight_dtype, ctx.vocab_major = hidden.dtype, vocab_major
        ctx.mark_non_differentiable(kl_logp)
        return token_logp, kl, kl_logp

    @staticmethod
    def backward(ctx, grad_token_logp, grad_kl, _):
        n_tokens, grad = len(ctx.labels), ctx.exp  # d logp[label] / d logits = onehot - probs; (n, V)
        if grad._version != ctx.exp_version:
            raise RuntimeError("_TargetHead: its logits buffer was overwritten (a later forward pass) before "
                               "this backward pass")
        grad[:n_tokens] *= (-grad_token_logp / ctx.total[:n_tokens])[:, None]
        grad[torch.arange(n_tokens, device=grad.device), ctx.labels] += grad_token_logp
        grad[n_tokens:] *= (ctx.excess - ctx.kl[:, None]) * (grad_kl / ctx.total[n_tokens:])[:, None]
        grad = grad.to(ctx.weight_dtype)
        grad_hidden = (ctx.weight.T @ grad.T).T if ctx.vocab_major else grad @ ctx.weight
        return grad_hidden, None, None, None, None, None


class _PerFactAdam:
    """torch.optim.Adam's update (default betas/eps), applied only to the rows marked active."""

    def __init__(self, shape, lr: float, device, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], device=device)

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, active: torch.Tensor) -> None:
        b1, b2 = self.betas
        rows = active.nonzero().squeeze(1)
        self.t[rows] += 1
        self.m[rows] = b1 * self.m[rows] + (1 - b1) * grad[rows]
        self.v[rows] = b2 * self.v[rows] + (1 - b2) * grad[rows] ** 2
        t = self.t[rows, None]
        step_size = self.lr / (1 - b1**t)
        denom = self.v[rows].sqrt() / (1 - b2**t).sqrt() + self.eps
        param[rows] -= step_size * self.m[rows] / denom


def optimize_targets(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    hook_module: str,
    hparams: TargetHparams = TargetHparams(),
    progress: bool = True,
    replay_lower_blocks: bool = True,
    own_blocks: bool = True,
    share_stems: bool = True,
) -> TargetResult:
    """Optimise the target of every request at `hook_module`'s output; chunks of facts share passes.

    `replay_lower_blocks`: the blocks below the edited one run at the first Adam step only (their
    outputs cannot depend on delta); off, every step runs them again (same result, for benchmarks).
    `own_blocks`: on fp32 Llama models on CPU, the blocks above the edited one run as
    `editlib.model.upper_blocks` (the same function, faster; everything below runs once), and so does the
    prefix pass (forward only); off, or on other models, the model's own modules run with a hook
    that adds delta.
    `share_stems`: the tokens several cached prefixes start with run once (`models.shared_stems`);
    off, every prefix runs whole (same keys and values, for benchmarks).
    """
    parts = []
    chunks = list(batches(requests, max(1, hparams.facts_per_chunk)))
    with grouped_attention(model):
        for chunk in tqdm(chunks, desc=f"targets @ {hook_module}", disable=not progress or len(chunks) < 2):
            parts.append(_optimize_chunk(model, tokenizer, chunk, templates, hook_module, hparams,
                                         replay_lower_blocks, own_blocks, share_stems))
    return TargetResult(*(torch.cat([getattr(p, f) for p in parts], dim=-1) for f in TargetResult.__dataclass_fields__))


def _split_points(model, row_ids, subject_last: torch.Tensor, cache_prefix: bool) -> torch.Tensor:
    """Where each row is split: its subject-last token (the prefix before it runs once), or 0
    (no split: `cache_prefix` off, or a sliding window that a split would shift, see
    `continuation_exact`)."""
    split = subject_last.clone()
    longest = int(split.max()) + max(len(ids) - s for ids, s in zip(row_ids, split.tolist()))
    return split if cache_prefix and continuation_exact(model, longest) else torch.zeros_like(split)


def _optimize_chunk(model, tokenizer, requests, templates, hook_module, hp: TargetHparams,
                    replay_lower_blocks: bool = True, own_blocks: bool = True,
                    share_stems: bool = True) -> TargetResult:
    device = next(model.parameters()).device
    n_facts, n_templates = len(requests), len(templates)
    targets = target_ids(tokenizer, [r.target_new for r in requests])
    prompts = build_context_prompts(
        tokenizer, requests, templates, suffixes=[t[:-1] for t in targets], extra_prompts=[hp.kl_prompt]
    )
    # the KL rows end at the subject's last token, where their KL is read: no later token of a row
    # can change the hidden states before it, so the rest of "{subject} is a" never needs to run
    row_ids = [ids[: s + 1] if kind == n_templates else ids
               for ids, s, kind in zip(prompts.ids, prompts.subject_last.tolist(), prompts.template.tolist())]
    split = _split_points(model, row_ids, prompts.subject_last, hp.cache_prefix)
    prefix_mask, batch, prefix_cache, position_ids = split_rows(model, row_ids, split, pad_id(tokenizer), device,
                                                                share_stems, own_blocks)
    split = split.to(device)
    fact = prompts.fact.to(device)
    subject_last = prompts.subject_last.to(device) - split  # in the re-run part
    rows = torch.arange(len(prompts.ids), device=device)
    is_kl = prompts.template.to(device) == n_templates

    # Target-token positions of the rewriting rows: position p scores token p + 1.
    target_len = torch.tensor([len(t) for t in targets], device=device)
    rewrite_rows = rows[~is_kl]
    lens = target_len[fact[rewrite_rows]]
    rewrite_index, offset = ragged_index(lens)
    tok_row = rewrite_rows[rewrite_index]
    tok_pos = prompts.prompt_lengths.to(device)[tok_row] - 1 + offset - split[tok_row]
    tok_label = torch.tensor([tid for r in rewrite_rows.tolist() for tid in targets[prompts.fact[r]]], device=device)
    tok_fact = fact[tok_row]
    tok_weight = 1.0 / (n_templates * target_len[tok_fact].float())
    kl_rows = rows[is_kl]  # one per fact, in fact order
    plain_rows = rows[prompts.template.to(device) == 0]

    hidden_size = model.config.hidden_size
    delta = torch.zeros(n_facts, hidden_size, device=device, requires_grad=True)
    h_init: torch.Tensor | None = None

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        nonlocal h_init
        if h_init is None:
            h_init = out[plain_rows, subject_last[plain_rows]].detach().float().clone()
        return out.index_put((rows, subject_last), delta[fact].to(out.dtype), accumulate=True)

    def model_continuation() -> torch.Tensor:
        return final_hidden_after(model, prefix_cache, prefix_mask, batch.input_ids,
                                  batch.attention_mask, position_ids)

    if own_blocks and upper_blocks.supports(model, hook_module):
        # the edited block's output is its output without delta + delta: everything up to that block
        # runs once, the blocks above it run as editlib's own Llama blocks at every step
        layer = block_index(model, hook_module)
        block = model_layout(model).block(layer)
        with (torch.no_grad(), capture_outputs(model, dict.fromkeys([hook_module, block])) as captured,
              stop_forward_after(model, block), contextlib.suppress(StopForward)):
            model_continuation()
        h_init = captured[hook_module][plain_rows, subject_last[plain_rows]].float().clone()
        below = captured[block]
        upper = upper_blocks.UpperBlocks(model, layer, prefix_cache, prefix_mask, batch.attention_mask,
                                         position_ids)
        edit = contextlib.nullcontext()

        def continuation() -> torch.Tensor:
            return upper(below.index_put((rows, subject_last), delta[fact].to(below.dtype), accumulate=True))
    else:
        edit = contextlib.ExitStack()
        edit.enter_context(edit_output(model, hook_module, add_delta))
        if replay_lower_blocks:
            edit.enter_context(replay_blocks_below(model, hook_module))
        continuation = model_continuation

    # one pass through the output matrix: the target tokens' rows, then the KL rows
    head_row, head_pos = torch.cat([tok_row, kl_rows]), torch.cat([tok_pos, subject_last[kl_rows]])
    head_bias = lm_head(model).bias
    head = lm_head(model).weight.detach()
    logits = _TargetHead.logits_buffer(head, len(head_row))  # reused at every step
    adam = _PerFactAdam(delta.shape, hp.v_lr, device)
    active = torch.ones(n_facts, dtype=torch.bool, device=device)
    loss_f = nll_f = torch.zeros(n_facts, device=device)
    kl_init = None
    with edit:
        for it in range(hp.v_num_grad_steps):
            hidden = continuation()
            token_logp, kl, kl_logp = _TargetHead.apply(hidden[head_row, head_pos], head, head_bias, tok_label,
                                                        kl_init, logits)
            nll = torch.zeros(n_facts, device=device).index_add(0, tok_fact, -token_logp * tok_weight)
            if kl_init is None:
                kl_init = kl_logp
            decay = hp.v_weight_decay * delta.norm(dim=1) / h_init.norm(dim=1) ** 2
            loss = nll + hp.kl_factor * kl + decay
            with torch.no_grad():
                loss_f = torch.where(active, loss.detach(), loss_f)
                nll_f = torch.where(active, nll.detach(), nll_f)
                active &= loss.detach() >= hp.early_stop_loss
            if it == hp.v_num_grad_steps - 1 or not active.any():
                break
            (grad,) = torch.autograd.grad((loss * active).sum(), delta)
            adam.step(delta.data, grad, active)
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * h_init.norm(dim=1)
                norm = delta.norm(dim=1)
                scale = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
                delta.mul_(scale[:, None])
    delta = delta.detach()
    return TargetResult(
        values=(h_init + delta).T.contiguous(),
        h_init=h_init.T.contiguous(),
        loss=loss_f,
        nll=nll_f,
        steps=adam.t.clone(),
    )

