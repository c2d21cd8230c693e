"""GRACE: a codebook adaptor on one module (Hartvigsen et al. 2023; docs/methods.md §5.6).

The adaptor watches one module (e.g. `model.layers.{l}.mlp.down_proj`). At one token per
sequence it takes the module's *input* there as a query q and looks up the nearest codebook key:

    d*, j* = min_j ||q - key_j||_2
    if d* <= eps_{j*}:  output[token(s)] = value_{j*}        (else the output is left untouched)

Base weights never change; an edit only adds or adjusts codebook entries and trains their
values (Adam on the values only, the LM loss of the edit).

Which token is the query (one per row, `query_positions`):
- editing: the last prompt token (the position whose logits predict the first target token),
  i.e. the reference's key_id = #(labels == -100) - 1, computed per row of the batch;
- inference: the last non-pad token of each row, read from the attention mask given to the model
  (right padding; generate's key_id = -1). With a KV cache (mask wider than the chunk) it is the
  chunk's last token. Without a mask it is position T - 1.
- scoring teacher-forced prompt+target batches: the default above would query the *last target*
  token, which is not what the edit trained (the edit would be invisible). Wrap such scoring in
  `editor.query_positions(prompt_lengths - 1)` (you built the batch), or in
  `editor.prompt_queries(prompt_texts)` (someone else builds and reorders the batches, e.g.
  metrics.score_continuations): a row starting with a registered prompt's ids queries that
  prompt's last token. Rows may have different positions; each row is decided on its own.

Replacement (per row, where that row's query hits): `replace_last` the query token only;
`replace_prompt` positions 0..query (inclusive: the reference's `[:, :t]` leaves the query token
itself out, which we read as an off-by-one); `replace_all` every position.

The adaptor is attached as forward hooks (no module is swapped), so parameter names and the
model's state_dict are unchanged, and `remove()` restores the original behaviour exactly.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from editlib.data.records import EditRequest
from editlib.editing.session import EditSession
from editlib.io import load_tensors, save_tensors
from editlib.methods.grace import GraceHparams
from editlib.model import upper_blocks
from editlib.model.forward import final_hidden_after, split_rows
from editlib.model.hooks import StopForward, capture_inputs, capture_outputs, stop_forward_after
from editlib.model.layout import block_index, lm_head, model_layout, module_dims
from editlib.model.tokens import TargetBatch, pad_id, prompt_ids, target_batch, target_nll

# --------------------------------------------------------------------------------------------
# Codebook


class GraceCodebook(nn.Module):
    """Keys (N, d_in), radii epsilons (N,), trainable values (N, d_out), labels (N strings)."""

    def __init__(self, key_dim: int, value_dim: int, init_eps: float):
        super().__init__()
        self.init_eps = init_eps
        self.register_buffer("keys", torch.zeros(0, key_dim))
        self.register_buffer("epsilons", torch.zeros(0))
        self.values = nn.Parameter(torch.zeros(0, value_dim), requires_grad=False)
        self.labels: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, N) euclidean distances from queries (B, d_in) to every key (exact, no matmul trick)."""
        return torch.cdist(queries.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) distance to and index of each query's nearest key."""
        return self.distances(queries).min(dim=1)

    def add(self, key: torch.Tensor, value: torch.Tensor, label: str) -> int:
        """Append one entry with radius init_eps; return its index."""
        self.keys = torch.cat([self.keys, key.detach().float().reshape(1, -1)])
        self.epsilons = torch.cat([self.epsilons, self.epsilons.new_tensor([self.init_eps])])
        values = torch.cat([self.values.detach(), value.detach().float().reshape(1, -1).to(self.values.device)])
        self.values = nn.Parameter(values, requires_grad=False)
        self.labels.append(label)
        return len(self.labels) - 1

    def absorb(self, query: torch.Tensor, label: str, value: torch.Tensor) -> tuple[int, str]:
        """Apply GRACE's codebook rule for one edit; return (index of the covering key, action).

        - no key within init_eps + eps_nearest: add a key ("add");
        - nearest key has another label: add a key, both radii become d*/2 ("split";
          the old one minus 1e-5 so the two balls never overlap);
        - same label: grow eps_nearest to d* if needed ("expand"), else nothing ("covered").
        """
        if len(self) == 0:
            return self.add(query, value, label), "add"
        distance, nearest = (t.item() for t in self.nearest(query.reshape(1, -1)))
        if distance > self.init_eps + self.epsilons[nearest].item():
            return self.add(query, value, label), "add"
        if self.labels[nearest] != label:
            index = self.add(query, value, label)
            self.epsilons[nearest] = distance / 2 - 1e-5
            self.epsilons[index] = distance / 2
            return index, "split"
        if distance > self.epsilons[nearest].item():
            self.epsilons[nearest] = distance
            return nearest, "expand"
        return nearest, "covered"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.contiguous(), "epsilons": self.epsilons.contiguous(), "values": self.values.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], labels: list[str]) -> None:
        if not len(tensors["keys"]) == len(tensors["epsilons"]) == len(tensors["values"]) == len(labels):
            raise ValueError("codebook tensors and labels differ in length")
        device = self.keys.device
        self.keys = tensors["keys"].float().to(device)
        self.epsilons = tensors["epsilons"].float().to(device)
        self.values = nn.Parameter(tensors["values"].float().to(device), requires_grad=False)
        self.labels = list(labels)


# --------------------------------------------------------------------------------------------
# Editor


def last_token_positions(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """(B,) default query position per row: last attended token (right padding), else T - 1.

    A mask wider than the chunk (KV-cache decoding) means each row's newest token: T - 1.
    """
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape != (batch, length):
        return torch.full((batch,), length - 1, dtype=torch.long)
    mask = attention_mask.bool().cpu()
    last = length - 1 - mask.flip(1).int().argmax(1)
    return torch.where(mask.any(1), last, torch.full_like(last, length - 1))


def prompt_end_positions(
    input_ids: torch.Tensor, prompts_by_length: dict[int, set[tuple[int, ...]]], default: torch.Tensor
) -> torch.Tensor:
    """(B,) per row, the last index of the longest registered prompt that prefixes it, else default."""
    positions = default.clone()
    rows = input_ids.tolist()
    for row, ids in enumerate(rows):
        for length in sorted(prompts_by_length, reverse=True):
            if length <= len(ids) and tuple(ids[:length]) in prompts_by_length[length]:
                positions[row] = length - 1
                break
    return positions


def replacement_region(positions: torch.Tensor, length: int, replacement: str) -> torch.Tensor:
    """(B, T) bool: which positions of each row take the value (if that row's query hits)."""
    steps = torch.arange(length, device=positions.device)[None, :]  # (1, T)
    if replacement == "replace_last":
        return steps == positions[:, None]
    if replacement == "replace_prompt":
        return steps <= positions[:, None]
    return torch.ones(len(positions), length, dtype=torch.bool, device=positions.device)


class GraceEditor:
    """GRACE on `module_name` of `model` (hooks attached on construction; `remove()` detaches).

    Sequential editing is the natural mode: every `edit` call adds to the same codebook.
    `own_blocks`: with replace_last on fp32 Llama models on CPU, training runs the prompt before
    its query token once and the blocks above the edited one as `editlib.model.upper_blocks` at every
    step (the same values to float rounding, several times faster); off, every step is a forward
    pass of the whole model through the hooks.
    """

    def __init__(self, model: nn.Module, tokenizer, module_name: str, hparams: GraceHparams | None = None,
                 own_blocks: bool = True):
        self.model = model
        self.own_blocks = own_blocks
        self.tokenizer = tokenizer
        self.module_name = module_name
        self.hparams = hparams or GraceHparams()
        self.module = model.get_submodule(module_name)
        key_dim, value_dim = module_dims(self.module)
        device = self.module.weight.device
        self.codebook = GraceCodebook(key_dim, value_dim, self.hparams.eps).to(device)
        self.generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed)
        self.active = True
        self._forced_positions: torch.Tensor | None = None
        self._prompt_table: dict[int, set[tuple[int, ...]]] | None = None  # prompt length -> prompt ids
        self._attention_mask: torch.Tensor | None = None
        self._input_ids: torch.Tensor | None = None
        self._handles = [
            model.base_model.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
            self.module.register_forward_hook(self._adapt, with_kwargs=True),
        ]

    # -- hooks ------------------------------------------------------------------------------

    def _remember_mask(self, module, args, kwargs):
        """Pre-hook on the base model: keep this pass's attention mask and input ids."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._attention_mask = mask if isinstance(mask, torch.Tensor) else None
        self._input_ids = ids if isinstance(ids, torch.Tensor) else None

    def _adapt(self, module, args, kwargs, output):
        """Forward hook: replace the output where a row's query falls inside its nearest key's ball."""
        if not self.active or len(self.codebook) == 0:
            return None
        hidden = args[0] if args else next(iter(kwargs.values()))  # (B, T, d_in)
        out = output[0] if isinstance(output, tuple) else output  # (B, T, d_out)
        batch, length = hidden.shape[:2]
        positions = self._positions(batch, length).to(hidden.device)  # (B,)
        queries = hidden[torch.arange(batch, device=hidden.device), positions]  # (B, d_in)
        distance, nearest = self.codebook.nearest(queries)
        hit = distance <= self.codebook.epsilons[nearest]  # (B,)
        if not bool(hit.any()):
            return None
        region = replacement_region(positions, length, self.hparams.replacement) & hit[:, None]  # (B, T)
        values = self.codebook.values[nearest].to(out.dtype)  # (B, d_out)
        edited = torch.where(region[..., None], values[:, None, :], out)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def _positions(self, batch: int, length: int) -> torch.Tensor:
        if self._forced_positions is not None:
            if self._forced_positions.shape != (batch,):
                raise ValueError(f"query_positions has shape {tuple(self._forced_positions.shape)}, batch is {batch}")
            if int(self._forced_positions.max()) >= length or int(self._forced_positions.min()) < 0:
                raise ValueError(f"query positions {self._forced_positions.tolist()} outside a sequence of length {length}")
            return self._forced_positions
        positions = last_token_positions(self._attention_mask, batch, length)
        if self._prompt_table is not None and self._input_ids is not None and self._input_ids.shape == (batch, length):
            positions = prompt_end_positions(self._input_ids.cpu(), self._prompt_table, positions)
        return positions

    # -- public API -------------------------------------------------------------------------

    @property
    def num_keys(self) -> int:
        return len(self.codebook)

    @contextlib.contextmanager
    def query_positions(self, positions: torch.Tensor | Sequence[int]) -> Iterator[None]:
        """Within the block, row b queries token positions[b] (e.g. prompt_lengths - 1 for scoring)."""
        previous = self._forced_positions
        self._forced_positions = torch.as_tensor(positions, dtype=torch.long).cpu()
        try:
            yield
        finally:
            self._forced_positions = previous

    @contextlib.contextmanager
    def prompt_queries(self, prompts: Sequence[str]) -> Iterator[None]:
        """Within the block, a row that starts with the ids of one of `prompts` queries that
        prompt's last token (the longest such prompt); other rows use the default (last token).

        For scoring code that builds its own prompt+target batches (e.g. length-sorted chunks):
        wrap the whole scoring call, no per-batch positions needed.
        """
        table: dict[int, set[tuple[int, ...]]] = {}
        for ids in prompt_ids(self.tokenizer, list(prompts)):
            table.setdefault(len(ids), set()).add(tuple(ids))
        previous, self._prompt_table = self._prompt_table, table
        try:
            yield
        finally:
            self._prompt_table = previous

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the model behaves as if unedited."""
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    def remove(self) -> None:
        """Detach the hooks: the model computes exactly what it did before GRACE was attached."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.active = False

    def edit(self, requests: Sequence[EditRequest]) -> dict[str, list]:
        """Add `requests` to the codebook and train their values.

        Returns per-request lists: the codebook action ("add", "split", "expand", "covered"), and the
        target NLL at the first training step (initial value in place) and after the last step.

        Queries are read in one batched forward; the codebook rule is applied request by request
        (in order, so later requests see earlier keys); then all touched values are trained
        together for n_iter Adam steps on the sum of per-request mean target NLLs. Each row only
        reaches its own key's value, so this equals editing one by one unless two requests share
        a key (same label, overlapping balls), in which case that value is fitted to both.
        """
        if not self._handles:
            raise RuntimeError("this GraceEditor was removed")
        batch = target_batch(self.tokenizer, [r.text for r in requests], [r.target_new for r in requests])
        batch = batch.to(self.module.weight.device)
        queries, current_outputs = self.edit_token_activations(batch)
        actions = []
        for row, request in enumerate(requests):
            value = self._initial_value(current_outputs[row])
            _, action = self.codebook.absorb(queries[row], request.target_new.strip(), value)
            actions.append(action)
        losses = (self._train_values_above(batch, queries) if self._trains_above()
                  else self._train_values(batch))
        return {"action": actions, "nll_first_step": losses[0].tolist(), "nll_final": losses[-1].tolist()}

    # -- edit internals ---------------------------------------------------------------------

    def edit_token_activations(self, batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Input (B, d_in) and unedited output (B, d_out) of the module at each row's last prompt token."""
        rows = torch.arange(len(batch.input_ids))
        positions = batch.last_prompt_positions
        with torch.no_grad(), self.disabled(), capture_outputs(self.model, [self.module_name]) as outputs:
            with capture_inputs(self.model, [self.module_name], stop_after=self.module_name) as inputs:
                with contextlib.suppress(StopForward):
                    self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        queries = inputs[self.module_name][rows, positions].float()
        current = outputs[self.module_name][rows, positions].float()
        return queries, current

    def _initial_value(self, current_output: torch.Tensor) -> torch.Tensor:
        if self.hparams.val_init == "warm":
            return current_output.detach().clone()
        return torch.rand(current_output.shape, generator=self.generator).to(current_output.device)

    def _train_values(self, batch: TargetBatch) -> list[torch.Tensor]:
        """n_iter Adam steps on the codebook values only, each a forward pass of the whole model;
        returns per-step (B,) target NLLs."""
        def row_nll() -> torch.Tensor:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            return target_nll(logits, batch.labels)

        with self.query_positions(batch.last_prompt_positions):
            return self._adam_steps(row_nll)

    def _trains_above(self) -> bool:
        """Whether `_train_values_above` applies: replace_last at an MLP's output projection (what
        the MLP, and so its block, adds to the residual) of a model `upper_blocks` runs."""
        if not self.own_blocks or self.hparams.replacement != "replace_last":
            return False
        layer = block_index(self.model, self.module_name)
        layout = model_layout(self.model)
        return (self.module_name == layout.rewrite(layer) and self.module_name.endswith(".down_proj")
                and upper_blocks.supports(self.model, layout.mlp(layer)))

    def _train_values_above(self, batch: TargetBatch, queries: torch.Tensor) -> list[torch.Tensor]:
        """`_train_values` on the blocks above the edited one: with replace_last only the query token's
        module output changes, by value - its unedited output, and its block's output by the same
        vector. So the tokens before each row's query token run once into a key/value cache, the
        query and target tokens once up to the edited block, and every Adam step runs the blocks
        above it (`upper_blocks.UpperBlocks`) and the output matrix at the target tokens only.
        Which rows hit which key is read once: training changes values, never keys or radii."""
        model, device = self.model, batch.input_ids.device
        layer = block_index(model, self.module_name)
        block = model_layout(model).block(layer)
        split = batch.last_prompt_positions.to(device)  # (B,) each row's query token starts its continuation
        ids = [row[:n] for row, n in zip(batch.input_ids.tolist(), batch.attention_mask.sum(1).tolist())]
        prefix_mask, rest, cache, position_ids = split_rows(model, ids, split, pad_id(self.tokenizer), device)
        with (torch.no_grad(), self.disabled(), capture_outputs(model, [self.module_name, block]) as captured,
              stop_forward_after(model, block), contextlib.suppress(StopForward)):
            final_hidden_after(model, cache, prefix_mask, rest.input_ids, rest.attention_mask, position_ids)
        below, unedited = captured[block], captured[self.module_name][:, 0].float()  # (B, T', d), (B, d)
        upper = upper_blocks.UpperBlocks(model, layer, cache, prefix_mask, rest.attention_mask, position_ids)
        distance, nearest = self.codebook.nearest(queries)
        hit = (distance <= self.codebook.epsilons[nearest])[:, None]  # (B, 1)
        token_row, token_pos = (batch.labels != -100).nonzero(as_tuple=True)  # target tokens, in row order
        labels = batch.labels[token_row, token_pos]
        counts = torch.bincount(token_row, minlength=len(ids)).clamp(min=1)
        head = lm_head(model)
        rows = torch.arange(len(ids), device=device)

        def row_nll() -> torch.Tensor:
            shift = torch.where(hit, self.codebook.values[nearest] - unedited, torch.zeros_like(unedited))
            hidden = upper(below.index_put((rows, torch.zeros_like(rows)), shift.to(below.dtype), accumulate=True))
            logits = head(hidden[token_row, token_pos - split[token_row]]).float()
            token_nll = F.cross_entropy(logits, labels, reduction="none")
            return torch.zeros(len(ids), device=device).index_add(0, token_row, token_nll) / counts

        return self._adam_steps(row_nll)

    def _adam_steps(self, row_nll) -> list[torch.Tensor]:
        """n_iter Adam steps on the codebook values of the loss `row_nll()` (B,) sums; per-step NLLs
        and the NLL after the last step."""
        values = self.codebook.values
        values.requires_grad_(True)
        optimizer = torch.optim.Adam([values], lr=self.hparams.edit_lr)
        losses = []
        try:
            for _ in range(self.hparams.n_iter):
                nll = row_nll()
                (grad,) = torch.autograd.grad(nll.sum(), [values])
                values.grad = grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(nll.detach())
            with torch.no_grad():
                losses.append(row_nll())
        finally:
            values.requires_grad_(False)
        return losses

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the codebook (keys, epsilons, values) and its labels/hparams to a safetensors file."""
        metadata = {
            "labels": json.dumps(self.codebook.labels),
            "hparams": json.dumps(asdict(self.hparams)),
            "module_name": self.module_name,
        }
        save_tensors(path, self.codebook.tensors(), metadata)

    @classmethod
    def load(cls, model: nn.Module, tokenizer, path: str | Path) -> "GraceEditor":
        """Attach a GraceEditor to `model` with the codebook saved at `path`."""
        tensors, metadata = load_tensors(path)
        editor = cls(model, tokenizer, metadata["module_name"], GraceHparams(**json.loads(metadata["hparams"])))
        editor.codebook.load_tensors(tensors, json.loads(metadata["labels"]))
        return editor


# --------------------------------------------------------------------------------------------
# Session (editlib.editing.session.EditSession)


class GraceSession(EditSession):
    """Sequential GRACE edits; the base weights never change, the codebook is the state."""

    scores_prompts_once = False  # prompt_queries matches whole rows that start with a prompt

    def __init__(self, model: nn.Module, tokenizer, spec: GraceHparams):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.module_name = model_layout(model).rewrite(spec.layers[0])
        self.editor = GraceEditor(model, tokenizer, self.module_name, spec)
        self.n_edits = 0

    def apply(self, requests: Sequence[EditRequest]) -> dict:
        self.n_edits += len(requests)
        return self.editor.edit(requests)

    def scoring(self, requests: Sequence[EditRequest]):
        """GRACE must query each scored row at its prompt's last token, not the target's."""
        prompts = [text for r in requests for text in (r.text, *r.paraphrase_prompts, *r.neighborhood_prompts)]
        return self.editor.prompt_queries(prompts)

    def restore(self) -> None:
        self.editor.remove()
        self.editor = GraceEditor(self.model, self.tokenizer, self.module_name, self.spec)
        self.n_edits = 0

    def close(self) -> None:
        self.editor.remove()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"codebook.{k}": v.cpu().contiguous() for k, v in self.editor.codebook.tensors().items()}
        state["n_edits"] = torch.tensor(self.n_edits)
        state["labels"] = torch.tensor(list(json.dumps(self.editor.codebook.labels).encode()), dtype=torch.uint8)
        state["generator"] = self.editor.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        labels = json.loads(bytes(state["labels"].tolist()).decode())
        tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("codebook.")}
        self.editor.codebook.load_tensors(tensors, labels)
        self.editor.generator.set_state(state["generator"])
        self.n_edits = int(state["n_edits"])
