"""MEND: a trained hypernetwork that turns an edit's gradient into a weight update (Mitchell et al.
2022; docs/methods.md §5.7).

For an edited Linear W (d_out, d_in) and the edit loss L (mean target NLL of the edit batch),
    grad_W L = sum_t delta_t u_t^T          u_t: the module input at token t, delta_t = dL/d(output_t)
MEND maps every factor pair through a small network g shared by all edited weights of one shape,
    (u~_t, delta~_t) = g(norm(u_t), norm(delta_t); layer l)
    W' = W - alpha_l * sum_t delta~_t u~_t^T                     (alpha_l learned, one per weight)
g is two identity-initialised low-rank residual layers per side ("IDMLP", n_hidden = 1), each with
a per-layer scale and shift; norm() standardises with running moments gathered during training
(identity until two samples have been seen, so a fresh hypernetwork is one plain gradient step).

Training (outer loop, Adam on g and alpha): per step a batch of edit requests is edited jointly;
    loss = c_edit * NLL(target_new | edit prompt and its paraphrases; W')
         + c_loc  * KL(p(. | locality prompt; W) || p(. | locality prompt; W'))
The locality prompts are each request's neighborhood prompts, or other training records' prompts.

Memory: no pass builds (rows x positions x vocab) logits. The rows of a batch run in consecutive
chunks of at most `LOGIT_TOKENS` (padded) positions, and the output head runs only on the positions
a loss reads (the target tokens; the locality prompts' attended positions); gradients are
accumulated chunk by chunk. So the largest logits tensor holds LOGIT_TOKENS x vocab floats (about
1 GB in float32 for Llama-3's 128,256 tokens) whatever the number of edits; the results equal the
unchunked computation up to float rounding.

Deviation from the reference: the sign. The reference adds alpha * g(grad) and relies on training
to flip it; here a fresh hypernetwork is gradient descent, as the paper writes W' = W - alpha * ...
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from editlib.data.records import EditRequest
from editlib.editing.session import EditSession
from editlib.io import load_tensors, save_tensors
from editlib.methods.mend import MendHparams, MendSpec  # noqa: F401  (defined there)
from editlib.model.layout import lm_head, model_layout, module_dims, weight_layout
from editlib.model.loading import model_fingerprint
from editlib.model.tokens import TargetBatch, pad_id, pad_right, prompt_ids, target_batch

# --------------------------------------------------------------------------------------------
# Gradient factors and functional weight updates


def edited_modules(model: nn.Module, hparams: MendHparams) -> list[str]:
    """The module names MEND edits: hparams.modules, else the last n_edit_layers rewrite modules."""
    if hparams.modules:
        return list(hparams.modules)
    layout = model_layout(model)
    return [layout.rewrite(layer) for layer in range(layout.n_layers - hparams.n_edit_layers, layout.n_layers)]


def batch_target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over every target token of the batch (the reference's masked "nll"). logits: (B, T, V)."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)


# Padded token positions per forward chunk (editlib.methods.mend's memory note): the logits of a chunk are
# at most LOGIT_TOKENS x vocab floats.
LOGIT_TOKENS = 2048


def row_chunks(lengths: Sequence[int], max_tokens: int | None = None) -> list[slice]:
    """Consecutive row ranges in which (rows x the longest row) <= max_tokens (default
    LOGIT_TOKENS), one row at least."""
    max_tokens = LOGIT_TOKENS if max_tokens is None else max_tokens
    chunks, start, width = [], 0, 0
    for row, length in enumerate(lengths):
        width_with = max(width, int(length))
        if row > start and (row - start + 1) * width_with > max_tokens:
            chunks.append(slice(start, row))
            start, width_with = row, int(length)
        width = width_with
    if len(lengths):
        chunks.append(slice(start, len(lengths)))
    return chunks


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) NLL of each label under its row of logits (N, V), in float32. Computed in the (1, V, N)
    layout that `batch_target_nll` and editlib.model.tokens.target_nll use on (B, T, V) logits, so the
    values and their gradients equal theirs bit for bit."""
    return F.cross_entropy(logits.float()[None].transpose(1, 2), labels[None], reduction="none")[0]


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) final-norm hidden states: the model without its output head."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class Factors(NamedTuple):
    """Rank-one gradient factors of one module: u (N, d_in), delta (N, d_out), rows (N,) batch row per token."""

    u: torch.Tensor
    delta: torch.Tensor
    rows: torch.Tensor


def gradient_factors(
    model: nn.Module, module_names: Sequence[str], batch: TargetBatch, separately: bool = False,
    max_tokens: int | None = None,
) -> dict[str, Factors]:
    """Per module, the rank-one factors of grad_W of the edit loss.

    The loss is the batch's mean target NLL (one joint edit), or with `separately` the sum of each
    row's mean target NLL (so the tokens of row b carry exactly row b's own gradient).
    sum_t delta_t u_t^T then equals grad_W (W as (d_out, d_in)). Factors are float32 and detached;
    tokens where either factor is zero are dropped. Model parameters need not require grad:
    an edited module's output that is not yet in a graph is made a leaf, never detached from one.
    Rows run in `row_chunks(max_tokens)` (rows do not interact, so each chunk's share of the loss
    gives its tokens' factors), with logits at the target positions only.
    """
    head = lm_head(model)
    targets = batch.labels != -100
    total = targets.sum()  # the joint loss's normaliser
    counts = targets.sum(1).clamp(min=1)  # each row's, for `separately`
    lengths = batch.attention_mask.sum(1).tolist()
    pieces: dict[str, list[Factors]] = {name: [] for name in module_names}
    for rows in row_chunks(lengths, max_tokens):
        width = max(lengths[rows])
        input_ids, mask = batch.input_ids[rows, :width], batch.attention_mask[rows, :width]
        labels = batch.labels[rows, :width]
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def hook(module, args, output, name):
            inputs[name] = args[0].detach()
            # keep the graph (later edited modules sit on paths from earlier ones); start one if frozen
            outputs[name] = output if output.requires_grad else output.detach().requires_grad_(True)
            return outputs[name]

        handles = [
            model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
            for name in module_names
        ]
        try:
            with torch.enable_grad():
                hidden = final_hidden_states(model, input_ids, mask)
                scored = labels != -100
                nll = torch.zeros(labels.shape, device=labels.device)
                nll[scored] = token_nll(head(hidden[scored]), labels[scored])  # (b, T), 0 off the targets
                loss = (nll.sum(1) / counts[rows]).sum() if separately else nll.sum() / total
                grads = torch.autograd.grad(loss, [outputs[name] for name in module_names])
        finally:
            for handle in handles:
                handle.remove()
        n_rows = input_ids.shape[0]
        row_ids = torch.arange(rows.start, rows.stop, device=input_ids.device).repeat_interleave(width)  # (b*T,)
        for name, grad in zip(module_names, grads):
            u = inputs[name].reshape(n_rows * width, -1).float()  # (b*T, d_in)
            delta = grad.reshape(n_rows * width, -1).float()  # (b*T, d_out)
            keep = (u != 0).any(1) & (delta != 0).any(1)
            pieces[name].append(Factors(u[keep], delta[keep], row_ids[keep]))
    return {name: Factors(*(torch.cat(parts) for parts in zip(*chunks))) for name, chunks in pieces.items()}


@contextlib.contextmanager
def added_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, module `name` computes with W + deltas[name]; W itself is untouched.

    A delta (d_out, d_in) applies to every row; per-request deltas (R, d_out, d_in) need `rows`
    (B,), the request whose delta each batch row uses. Implemented as output += input @ delta^T,
    so the deltas stay differentiable.
    """

    def hook(module, args, output, delta):
        if delta.dim() == 2:
            return output + F.linear(args[0], delta.to(output.dtype))
        per_row = delta[rows].to(output.dtype)  # (B, d_out, d_in)
        return output + torch.einsum("bti,boi->bto", args[0], per_row)

    if rows is None and any(delta.dim() == 3 for delta in deltas.values()):
        raise ValueError("per-request deltas need `rows`")
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, delta=delta: hook(m, a, o, delta))
        for name, delta in deltas.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def locality_kl(base_logits: torch.Tensor, post_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over attended positions of KL(p_base || p_post) of the next-token distributions."""
    base = F.log_softmax(base_logits.float(), -1)  # (B, T, V)
    post = F.log_softmax(post_logits.float(), -1)
    kl = (base.exp() * (base - post)).sum(-1)  # (B, T)
    mask = attention_mask.bool()
    return kl[mask].mean()


# --------------------------------------------------------------------------------------------
# Hypernetwork


class RunningMoments(nn.Module):
    """Per-feature running mean and variance (Chan's parallel update), for input normalisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of x (N, dim) into the moments."""
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.mean += shift * float(n / total)
        self.m2 += batch_m2 + shift**2 * float(self.count * n / total)
        self.count.fill_(total)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std once two samples have been seen; identity before."""
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1).float()).sqrt()
        return (x - self.mean) / (std + 1e-7)


class LowRankResidual(nn.Module):
    """x + relu((u v x + b) * scale_l + shift_l): identity at init (u = 0); rank-r; per-layer l scale/shift."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        rank = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.randn(rank, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias  # (N, dim)
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return x + pre.clamp(min=0)  # clamp, not relu: the gradient at 0 is 1 (as the reference)


class FactorNet(nn.Module):
    """n_hidden + 1 identity-initialised low-rank residual layers on one factor side."""

    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int):
        super().__init__()
        self.layers = nn.ModuleList([LowRankResidual(dim, rank, n_modes) for _ in range(n_hidden + 1)])

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mode)
        return x


class GradientTransform(nn.Module):
    """g for all edited weights of one shape: normalise, then map u and delta by separate nets."""

    def __init__(self, d_in: int, d_out: int, hparams: MendHparams, n_modes: int):
        super().__init__()
        self.norm = hparams.norm
        self.u_moments = RunningMoments(d_in)
        self.delta_moments = RunningMoments(d_out)
        self.u_net = FactorNet(d_in, hparams.rank, hparams.n_hidden, n_modes)
        self.delta_net = FactorNet(d_out, hparams.rank, hparams.n_hidden, n_modes)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int, update_stats: bool = False):
        if update_stats:
            self.u_moments.update(u)
            self.delta_moments.update(delta)
        if self.norm:
            u, delta = self.u_moments.normalise(u), self.delta_moments.normalise(delta)
        return self.u_net(u, mode), self.delta_net(delta, mode)


def _shape_key(d_in: int, d_out: int) -> str:
    return f"{d_out}x{d_in}"


class MendHypernet(nn.Module):
    """Gradient transforms shared per weight shape, and one learned step size alpha per weight."""

    def __init__(self, model: nn.Module, module_names: Sequence[str], hparams: MendHparams):
        super().__init__()
        self.module_names = list(module_names)
        dims = {name: module_dims(model.get_submodule(name)) for name in self.module_names}
        by_shape: dict[str, list[str]] = {}
        for name in self.module_names:
            by_shape.setdefault(_shape_key(*dims[name]), []).append(name)
        self.shape_of = {name: _shape_key(*dims[name]) for name in self.module_names}
        self.mode_of = {name: by_shape[self.shape_of[name]].index(name) for name in self.module_names}
        self.transforms = nn.ModuleDict(
            {key: GradientTransform(*dims[names[0]], hparams, n_modes=len(names)) for key, names in by_shape.items()}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.module_names),), float(hparams.edit_lr)))

    def forward(self, factors: dict[str, Factors], n_rows: int | None = None, update_stats: bool = False) -> dict[str, torch.Tensor]:
        """Weight deltas name -> -alpha_l * sum_t delta~_t u~_t^T: one (d_out, d_in) summed over all
        tokens, or with n_rows one (n_rows, d_out, d_in) per batch row (tokens grouped by factors.rows)."""
        deltas = {}
        for index, name in enumerate(self.module_names):
            u, delta, rows = factors[name]
            transform = self.transforms[self.shape_of[name]]
            u_tilde, delta_tilde = transform(u, delta, self.mode_of[name], update_stats)
            if n_rows is None:
                update = delta_tilde.T @ u_tilde  # (d_out, d_in)
            else:
                row_onehot = F.one_hot(rows, n_rows).to(u_tilde.dtype)  # (N, R)
                update = torch.einsum("nr,no,ni->roi", row_onehot, delta_tilde, u_tilde)  # (R, d_out, d_in)
            deltas[name] = -self.edit_lrs[index] * update
        return deltas


# --------------------------------------------------------------------------------------------
# Editor


def _storage_delta(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """A (d_out, d_in) delta in the layout and dtype of module.weight."""
    return weight_layout(module, delta).to(module.weight.dtype).contiguous()


@dataclass
class MendEditor:
    """A trained (or fresh) MEND hypernetwork bound to a model and tokenizer."""

    model: nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    hypernet: MendHypernet = field(repr=False)
    hparams: MendHparams
    history: list[dict] = field(default_factory=list)  # training curve, one row per logged step

    @classmethod
    def fresh(cls, model: nn.Module, tokenizer, hparams: MendHparams | None = None) -> "MendEditor":
        """An untrained editor: identity transforms, identity normaliser, alpha = edit_lr."""
        hparams = hparams or MendHparams()
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(hparams.seed)
            hypernet = MendHypernet(model, edited_modules(model, hparams), hparams).to(device)
        return cls(model, tokenizer, hypernet, hparams)

    def edit_batch(self, requests: Sequence[EditRequest]) -> TargetBatch:
        """Edit prompts with target_new, one row per request, on the model's device."""
        device = next(self.model.parameters()).device
        return target_batch(self.tokenizer, [r.text for r in requests], [r.target_new for r in requests]).to(device)

    def module_deltas(
        self, requests: Sequence[EditRequest], separately: bool = False, update_stats: bool = False
    ) -> dict[str, torch.Tensor]:
        """Differentiable deltas module name -> (d_out, d_in) editing `requests` jointly, or with
        `separately` (R, d_out, d_in): request r's own single edit, from one batched pass."""
        factors = gradient_factors(self.model, self.hypernet.module_names, self.edit_batch(requests), separately)
        return self.hypernet(factors, n_rows=len(requests) if separately else None, update_stats=update_stats)

    def edit(self, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        """Apply the edit in place; return parameter name -> delta in the weight's own layout/dtype.

        `weight -= delta` undoes it up to rounding; use `applied()` for an exact restore.
        """
        with torch.no_grad():
            deltas = self.module_deltas(requests)
            stored = {}
            for name, delta in deltas.items():
                module = self.model.get_submodule(name)
                stored[f"{name}.weight"] = _storage_delta(module, delta)
                module.weight += stored[f"{name}.weight"]
        return stored

    @contextlib.contextmanager
    def applied(self, requests: Sequence[EditRequest]) -> Iterator[dict[str, torch.Tensor]]:
        """Edit in place for the duration of the block, then restore the weights bit for bit."""
        originals = {name: self.model.get_submodule(name).weight.detach().clone() for name in self.hypernet.module_names}
        try:
            yield self.edit(requests)
        finally:
            with torch.no_grad():
                for name, weight in originals.items():
                    self.model.get_submodule(name).weight.copy_(weight)

    def save(self, path: str | Path) -> None:
        """Write the hypernetwork (weights, alphas, normaliser moments) and hparams as safetensors."""
        metadata = {
            "hparams": json.dumps(asdict(self.hparams)),
            "module_names": json.dumps(self.hypernet.module_names),
            "model_fingerprint": model_fingerprint(self.model),
            "history": json.dumps(self.history),
        }
        save_tensors(path, self.hypernet.state_dict(), metadata)

    @classmethod
    def load(cls, model: nn.Module, tokenizer, path: str | Path) -> "MendEditor":
        """Bind a saved hypernetwork to `model` (which must have the same edited module shapes)."""
        device = next(model.parameters()).device
        tensors, metadata = load_tensors(path, device)
        hparams = MendHparams(**json.loads(metadata["hparams"]))
        hparams = MendHparams(**{**asdict(hparams), "modules": tuple(json.loads(metadata["module_names"]))})
        editor = cls.fresh(model, tokenizer, hparams)
        editor.hypernet.load_state_dict(tensors)
        editor.history = json.loads(metadata.get("history", "[]"))
        return editor


# --------------------------------------------------------------------------------------------
# Session (editlib.editing.session.EditSession)


class MendSession(EditSession):
    """Sequential MEND edits with a trained hypernetwork; the edited weights are the state."""

    def __init__(self, model: nn.Module, tokenizer, spec: MendSpec):
        self.model = model
        self.editor = MendEditor.load(model, tokenizer, spec.checkpoint)
        self.names = [f"{name}.weight" for name in self.editor.hypernet.module_names]
        self.original = {name: model.get_parameter(name).detach().clone() for name in self.names}
        self.n_edits = 0

    def apply(self, requests: Sequence[EditRequest]) -> dict:
        self.n_edits += len(requests)
        self.editor.edit(requests)
        return {}

    def restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.original.items():
                self.model.get_parameter(name).copy_(weight)
        self.n_edits = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"weight.{n}": self.model.get_parameter(n).detach().cpu().contiguous() for n in self.names}
        state["n_edits"] = torch.tensor(self.n_edits)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.names:
                self.model.get_parameter(name).copy_(state[f"weight.{name}"])
        self.n_edits = int(state["n_edits"])


# --------------------------------------------------------------------------------------------
# Training and evaluation


def locality_prompts(requests: Sequence[EditRequest], pool: Sequence[EditRequest], n: int, rng: random.Random) -> list[str]:
    """n prompts per request: its neighborhood prompts, else prompts of records outside the batch."""
    batch_ids = {r.case_id for r in requests}
    others = [r.text for r in pool if r.case_id not in batch_ids]
    texts = []
    for request in requests:
        candidates = list(request.neighborhood_prompts) or others
        texts += rng.sample(candidates, min(n, len(candidates)))
    return texts


def generalisation_batch(editor: MendEditor, requests: Sequence[EditRequest]) -> tuple[TargetBatch, torch.Tensor]:
    """Edit prompts plus their paraphrases, each with target_new (the L_edit inputs), and (B,) the
    index of the request each row belongs to."""
    prompts, targets, owners = [], [], []
    for index, request in enumerate(requests):
        for text in (request.text, *request.paraphrase_prompts):
            prompts.append(text)
            targets.append(request.target_new)
            owners.append(index)
    device = next(editor.model.parameters()).device
    return target_batch(editor.tokenizer, prompts, targets).to(device), torch.tensor(owners, device=device)


def prompt_batch(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt ids (with BOS) and attention mask."""
    batch = pad_right(prompt_ids(tokenizer, texts), pad_id(tokenizer))
    return batch.input_ids.to(device), batch.attention_mask.to(device)


class EditedScores(NamedTuple):
    """What the losses and metrics read of the edited model: per generalisation row, the mean
    target NLL and whether every target token is the argmax; the mean NLL over all their target
    tokens (L_edit); the mean locality KL over the locality prompts' attended positions (L_loc)."""

    row_nll: torch.Tensor
    row_correct: torch.Tensor
    edit_nll: torch.Tensor
    locality_kl: torch.Tensor


def edited_scores(editor: MendEditor, deltas: dict[str, torch.Tensor], gen: TargetBatch, gen_owners: torch.Tensor,
                  loc_ids: torch.Tensor, loc_mask: torch.Tensor, loc_owners: torch.Tensor | None,
                  weights: tuple[float, float] | None = None, max_tokens: int | None = None) -> EditedScores:
    """Scores of the model with `deltas` added: joint (d_out, d_in) deltas, or per-request deltas
    (R, d_out, d_in) that row b of the generalisation batch (locality prompts) reads at
    gen_owners[b] (loc_owners[b]).

    Rows run in `row_chunks(max_tokens)`, the head only on the scored positions. With `weights`
    (c_edit, c_loc), the gradient of c_edit * L_edit + c_loc * L_loc is accumulated, chunk by
    chunk, into the .grad of the deltas (leaves that require grad); else nothing is differentiated.
    """
    model, head = editor.model, lm_head(editor.model)
    per_request = any(delta.dim() == 3 for delta in deltas.values())
    train = weights is not None
    leaves = list(deltas.values())
    targets = gen.labels != -100
    total_targets = targets.sum()
    device = gen.input_ids.device
    nll_sum = torch.zeros(len(gen.input_ids), device=device)
    misses = torch.zeros(len(gen.input_ids), dtype=torch.long, device=device)
    edit_sum = torch.zeros((), device=device)
    gen_lengths = gen.attention_mask.sum(1).tolist()
    for rows in row_chunks(gen_lengths, max_tokens):
        width = max(gen_lengths[rows])
        labels = gen.labels[rows, :width]
        scored = labels != -100
        with torch.set_grad_enabled(train), added_deltas(model, deltas, rows=gen_owners[rows] if per_request else None):
            hidden = final_hidden_states(model, gen.input_ids[rows, :width], gen.attention_mask[rows, :width])
            logits = head(hidden[scored])  # (target tokens of the chunk, V)
            nll = torch.zeros(labels.shape, device=device)
            nll[scored] = token_nll(logits, labels[scored])  # (b, T), 0 off the targets
            if train:
                torch.autograd.backward(nll.sum() / total_targets * weights[0], inputs=leaves)
        nll_sum[rows] = nll.detach().sum(1)
        missed = torch.zeros(labels.shape, dtype=torch.long, device=device)
        missed[scored] = (logits.detach().argmax(-1) != labels[scored]).long()
        misses[rows] = missed.sum(1)
        # nll_loss over the (b, T) layout of the (B, V, T) cross entropy: its sum, bit for bit
        edit_sum += F.nll_loss(-nll.detach()[:, None], torch.where(scored, 0, -100), reduction="sum")
    locality_sum = torch.zeros((), device=device)
    attended_total = loc_mask.sum()
    loc_lengths = loc_mask.sum(1).tolist()
    for rows in row_chunks(loc_lengths, max_tokens):
        width = max(loc_lengths[rows])
        ids, mask = loc_ids[rows, :width], loc_mask[rows, :width]
        attended = mask.bool()
        with torch.no_grad():
            base = F.log_softmax(head(final_hidden_states(model, ids, mask)[attended]).float(), -1)  # (positions, V)
        with torch.set_grad_enabled(train), \
                added_deltas(model, deltas, rows=loc_owners[rows] if per_request else None):
            post = F.log_softmax(head(final_hidden_states(model, ids, mask)[attended]).float(), -1)
            kl = (base.exp() * (base - post)).sum(-1).sum()
            if train:
                torch.autograd.backward(kl / attended_total * weights[1], inputs=leaves)
        locality_sum += kl.detach()
    counts = targets.sum(1).clamp(min=1)
    return EditedScores(nll_sum / counts, misses == 0, edit_sum / total_targets, locality_sum / attended_total)


def mend_step(editor: MendEditor, requests: Sequence[EditRequest], loc_texts: Sequence[str],
              max_tokens: int | None = None) -> tuple[list[torch.Tensor], float, float, float]:
    """One training step's gradients of c_edit * L_edit + c_loc * L_loc after one joint edit of
    `requests` with respect to the hypernetwork's parameters (network, then alphas), and
    (L_edit, L_loc, edit success). The losses' gradients with respect to the weight deltas are
    accumulated chunk by chunk, then carried into the hypernetwork in one backward pass."""
    hparams, hypernet = editor.hparams, editor.hypernet
    deltas = editor.module_deltas(requests, update_stats=True)  # differentiable in the hypernetwork
    leaves = {name: delta.detach().requires_grad_(True) for name, delta in deltas.items()}
    gen, gen_owners = generalisation_batch(editor, requests)
    loc_ids, loc_mask = prompt_batch(editor.tokenizer, loc_texts, gen.input_ids.device)
    scores = edited_scores(editor, leaves, gen, gen_owners, loc_ids, loc_mask, None,
                           weights=(hparams.c_edit, hparams.c_loc), max_tokens=max_tokens)
    params = [p for name, p in hypernet.named_parameters() if name != "edit_lrs"] + [hypernet.edit_lrs]
    grads = torch.autograd.grad(list(deltas.values()), params, grad_outputs=[leaves[name].grad for name in deltas])
    return list(grads), float(scores.edit_nll), float(scores.locality_kl), float(scores.row_correct.float().mean())


def train_mend(
    model: nn.Module,
    tokenizer,
    train_requests: Sequence[EditRequest],
    hparams: MendHparams | None = None,
    eval_requests: Sequence[EditRequest] = (),
) -> MendEditor:
    """Train a MEND hypernetwork on `train_requests`; the model's weights are never changed.

    editor.history gets one row at step 0, every log_every steps and at the end: alpha, the mean
    training losses since the previous row, and held-out metrics (`evaluate_mend(eval_requests)`).
    """
    hparams = hparams or MendHparams()
    editor = MendEditor.fresh(model, tokenizer, hparams)
    hypernet = editor.hypernet
    rng = random.Random(hparams.seed)
    net_params = [p for name, p in hypernet.named_parameters() if name != "edit_lrs"]
    params = net_params + [hypernet.edit_lrs]
    optimizer = torch.optim.Adam([{"params": net_params, "lr": hparams.lr}, {"params": [hypernet.edit_lrs], "lr": hparams.lr_lr}])
    recent: list[tuple[float, float, float]] = []
    for step in range(hparams.steps + 1):
        if step % hparams.log_every == 0 or step == hparams.steps:
            editor.history.append(training_row(step, hypernet, recent, evaluate_mend(editor, eval_requests)))
            recent = []
        if step == hparams.steps:
            break
        requests = rng.sample(list(train_requests), min(hparams.batch_size, len(train_requests)))
        loc_texts = locality_prompts(requests, train_requests, hparams.n_locality, rng)
        grads, l_edit, l_loc, success = mend_step(editor, requests, loc_texts)
        for param, grad in zip(params, grads):
            param.grad = grad
        torch.nn.utils.clip_grad_norm_(params, hparams.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append((l_edit, l_loc, success))
    return editor


def training_row(step: int, hypernet: MendHypernet, recent: list[tuple[float, float, float]], held_out: dict) -> dict:
    """One tidy history row: step, alpha per weight, mean training losses since the last row, held-out metrics."""
    row: dict = {"step": step, "alpha": [round(a, 8) for a in hypernet.edit_lrs.tolist()]}
    if recent:
        for index, key in enumerate(("train_edit_nll", "train_loc_kl", "train_success")):
            row[key] = sum(r[index] for r in recent) / len(recent)
    return {**row, **held_out}


# Floats of the per-request weight deltas one evaluation pass holds (1 GiB in float32): held-out
# requests are edited in groups of at most this many (R, d_out, d_in) floats over all edited modules.
DELTA_FLOATS = 2**28


def evaluate_mend(editor: MendEditor, requests: Sequence[EditRequest], max_tokens: int | None = None,
                  max_delta_floats: int | None = None) -> dict[str, float]:
    """Held-out metrics, each request edited on its own (batched passes; weights untouched):
    edit_nll (mean target NLL on the edit prompt), edit_success / paraphrase_success (every target
    token is the teacher-forced argmax), locality_kl (KL on one neighborhood prompt per request).

    Each request's own deltas are (d_out, d_in) per edited module (Llama-3-8B's down_proj: 235 MB
    in float32), so the requests run in groups whose deltas stay within `max_delta_floats`
    (default DELTA_FLOATS); one group gives the numbers of one pass bit for bit.
    """
    if not requests:
        return {}
    rng = random.Random(0)
    loc_texts = [locality_prompts([r], requests, 1, rng)[0] for r in requests]
    per_request = sum(math.prod(module_dims(editor.model.get_submodule(name))) for name in editor.hypernet.module_names)
    group = max(1, (DELTA_FLOATS if max_delta_floats is None else max_delta_floats) // per_request)
    edit_nll, edit_correct, paraphrase_correct, kl_sum, attended = [], [], [], 0.0, 0
    for start in range(0, len(requests), group):
        part = list(requests[start:start + group])
        with torch.no_grad():
            deltas = editor.module_deltas(part, separately=True)
            gen, owners = generalisation_batch(editor, part)
            loc_ids, loc_mask = prompt_batch(editor.tokenizer, loc_texts[start:start + group], gen.input_ids.device)
            scores = edited_scores(editor, deltas, gen, owners, loc_ids, loc_mask,
                                   torch.arange(len(part), device=loc_ids.device), max_tokens=max_tokens)
        first = torch.ones_like(owners, dtype=torch.bool)
        first[1:] = owners[1:] != owners[:-1]  # the edit prompt is each request's first row
        correct = scores.row_correct.float()
        edit_nll.append(scores.row_nll[first])
        edit_correct.append(correct[first])
        paraphrase_correct.append(correct[~first])
        kl_sum, attended = kl_sum + scores.locality_kl * loc_mask.sum(), attended + loc_mask.sum()
    paraphrases = torch.cat(paraphrase_correct)
    return {
        "edit_nll": float(torch.cat(edit_nll).mean()),
        "edit_success": float(torch.cat(edit_correct).mean()),
        "paraphrase_success": float(paraphrases.mean()) if len(paraphrases) else float("nan"),
        "locality_kl": float(kl_sum / attended) if len(edit_nll) > 1 else float(scores.locality_kl),
    }
