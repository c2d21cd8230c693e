"""The locate-and-edit session (ROME, r-ROME, MEMIT, EMMET, AlphaEdit): batches of requests
applied sequentially or independently.

The session keeps the original edited matrices and the accumulated update of each layer in fp32,
and always sets W = W_orig + total_update (cast to the model dtype): fp16/bf16 models do not
accumulate rounding across batches, and a session restored from its saved state (the updates
and AlphaEdit's edited-key products) holds bit-identical weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editlib.data.records import EditRequest
from editlib.editing.hparams import LocateEditHparams
from editlib.editing.keys import (
    average_over_templates,
    build_context_prompts,
    compute_keys,
    plain_rows,
    read_at_subject,
    template_weights,
)
from editlib.editing.session import EditSession
from editlib.editing.target_store import TargetStore, fact_key
from editlib.editing.templates import sample_context_templates
from editlib.editing.updates import (
    Covariance,
    UpdateError,
    nullspace_projector,
    rome_directions,
    update_norm_squared,
    weight_update,
)
from editlib.editing.values import TargetResult, optimize_targets
from editlib.io import load_tensors, save_tensors
from editlib.model.layout import edited_bias, edited_weight, model_layout

log = logging.getLogger(__name__)


@dataclass
class SingleEdits:
    """Independent single-fact edits as rank-one factors: fact i adds R[l][:, i] B[l][:, i]^T to layer l."""

    residuals: dict[int, torch.Tensor]  # layer -> (d, N)
    directions: dict[int, torch.Tensor]  # layer -> (d_k, N)
    target_loss: torch.Tensor  # (N,)

    def delta(self, layer: int, index: int) -> torch.Tensor:
        return torch.outer(self.residuals[layer][:, index], self.directions[layer][:, index])


class Editor(EditSession):
    """An editing session over one model with one method's hyperparameters.

    `second_moments` maps each edited layer to C = E[k k^T] of the UNEDITED model (never
    recomputed during sequential editing, as in the reference). `target_store` shares the z of
    the unedited model across sessions and jobs (on disk).
    """

    def __init__(self, model, tokenizer, hparams: LocateEditHparams, second_moments: dict[int, torch.Tensor] | None = None,
                 templates: Sequence[str] | None = None, progress: bool = True,
                 target_store: TargetStore | None = None):
        self.model, self.tokenizer, self.hparams, self.progress = model, tokenizer, hparams, progress
        self.target_store = target_store
        self.layout = model_layout(model)
        for layer in hparams.layers:
            self.layout.check_layer(layer)
        needs_stats = hparams.needs_statistics
        missing = [l for l in hparams.layers if needs_stats and (second_moments is None or l not in second_moments)]
        if missing:
            raise ValueError(f"{hparams.method}: second-moment statistics missing for layers {missing}")
        device = next(model.parameters()).device
        self.covariances = {l: Covariance.from_mean(second_moments[l], device) for l in hparams.layers} if needs_stats else {}
        self.templates = list(templates) if templates is not None else sample_context_templates(
            model, tokenizer, hparams.context_lengths, hparams.template_seed)
        self.original = {l: edited_weight(model, self.layout, l).detach().clone() for l in hparams.layers}
        self.total = {l: torch.zeros(self.original[l].shape, dtype=torch.float32, device=device) for l in hparams.layers}
        self.key_products: dict[int, torch.Tensor | None] = {l: None for l in hparams.layers}
        self._projectors: dict[int, torch.Tensor] = {}
        self._target_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._original_norms: dict[tuple[int, str | None], float] = {}
        self.n_edits = 0

    @classmethod
    def open(cls, ctx, hparams: LocateEditHparams) -> "Editor":
        """A session on an experiment context's model, statistics, templates and target store."""
        return cls(ctx.model, ctx.tokenizer, hparams, ctx.second_moments, ctx.templates(hparams), ctx.progress,
                   ctx.target_store)

    # ---- weights -------------------------------------------------------------------------
    def _set_weight(self, layer: int) -> None:
        weight = edited_weight(self.model, self.layout, layer)
        with torch.no_grad():
            weight.copy_((self.original[layer].float() + self.total[layer]).to(weight.dtype))

    def _add_update(self, layer: int, delta: torch.Tensor) -> None:
        self.total[layer] += delta.to(self.total[layer])
        self._set_weight(layer)

    def restore(self) -> None:
        """Put the original weights back and forget all edits (and AlphaEdit's key store)."""
        for layer in self.hparams.layers:
            self.total[layer].zero_()
            self._set_weight(layer)
            self.key_products[layer] = None
        self.n_edits = 0

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"update.{l}": t.cpu().contiguous() for l, t in self.total.items()}
        state.update({f"key_product.{l}": t.cpu().contiguous() for l, t in self.key_products.items() if t is not None})
        state["n_edits"] = torch.tensor(self.n_edits)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for layer in self.hparams.layers:
            self.total[layer] = state[f"update.{layer}"].to(self.total[layer].device, torch.float32).clone()
            product = state.get(f"key_product.{layer}")
            self.key_products[layer] = product.to(self.total[layer].device).clone() if product is not None else None
            self._set_weight(layer)
        self.n_edits = int(state["n_edits"])

    def save(self, path: str | Path) -> None:
        """Atomically save the accumulated updates (safetensors) so they can be re-applied."""
        save_tensors(path, self.state_dict(), {"method": self.hparams.method,
                                               "layers": ",".join(map(str, self.hparams.layers))})

    def load(self, path: str | Path) -> None:
        """Re-apply updates saved by `save` (on the same original model)."""
        self.load_state_dict(load_tensors(path)[0])

    # ---- editing -------------------------------------------------------------------------
    def apply(self, requests: Sequence[EditRequest]) -> dict:
        """Edit the model with `requests` as one batch; weights stay edited (sequential editing)."""
        if not requests:
            return {}
        report = self._apply_rome(requests) if self.hparams.one_fact_at_a_time else self._apply_spread(requests)
        self.n_edits += len(requests)
        return report

    def projector(self, layer: int, threshold: float) -> torch.Tensor:
        """The projector onto the null space of `layer`'s C (eigenvalues below `threshold`), cached."""
        if (layer, threshold) not in self._projectors:
            self._projectors[(layer, threshold)] = nullspace_projector(self.covariances[layer], threshold)
        return self._projectors[(layer, threshold)]

    def _unedited(self) -> bool:
        return all(not total.any() for total in self.total.values())

    def _optimize(self, requests, hook_module: str) -> TargetResult:
        result = optimize_targets(self.model, self.tokenizer, requests, self.templates, hook_module,
                                  self.hparams.targets, self.progress)
        finite = torch.isfinite(result.values).all(0)
        if not finite.all():
            bad = [str(r.case_id) for r, ok in zip(requests, finite) if not ok]
            raise UpdateError(f"target values are NaN/Inf for case_id(s) {', '.join(bad)}; "
                              "check the model dtype (fp16 overflow) and v_lr")
        return result

    def _targets(self, requests, hook_module: str) -> TargetResult:
        """Target values z (d, N). On the unedited weights a fact's z does not depend on the other
        facts of its batch (independent deltas), so it is computed once per session (e.g. across
        the batch sizes of the batched experiment) and, with a target store, once per model."""
        if not self._unedited():
            return self._optimize(requests, hook_module)
        keys = [(hook_module, *fact_key(r)) for r in requests]
        missing = list({key: r for r, key in zip(requests, keys) if key not in self._target_cache}.values())
        store = self.target_store
        stored = [r for r in missing if store is not None and store.covers(r)]
        fresh = [r for r in missing if store is None or not store.covers(r)]
        if stored:
            def optimize(block):
                result = self._optimize(block, hook_module)
                return result.values, result.loss

            values, loss = store.targets(stored, hook_module, self.hparams.targets, self.templates, optimize)
            self._remember(stored, hook_module, values, loss)
        if fresh:
            result = self._optimize(fresh, hook_module)
            self._remember(fresh, hook_module, result.values, result.loss)
        device = next(self.model.parameters()).device
        values = torch.stack([self._target_cache[key][0] for key in keys], dim=1).to(device)
        loss = torch.stack([self._target_cache[key][1] for key in keys]).to(device)
        return TargetResult(values=values, h_init=values.new_zeros(0), loss=loss, nll=loss.new_zeros(0),
                            steps=loss.new_zeros(0))

    def _remember(self, requests, hook_module: str, values: torch.Tensor, loss: torch.Tensor) -> None:
        for i, r in enumerate(requests):
            self._target_cache[(hook_module, *fact_key(r))] = (values[:, i].clone(), loss[i].clone())

    def _spread_updates(self, requests, independent: bool, values: torch.Tensor | None = None,
                        loss: torch.Tensor | None = None) -> tuple[dict, dict, torch.Tensor]:
        """MEMIT/EMMET/AlphaEdit: residuals spread over layers (docs/methods.md §5.3); applies each layer's update.

        `values` (d, N) are the targets z when already optimised on the current model.
        """
        layers = self.hparams.layers
        z_module = self.layout.block(layers[-1])
        if values is None:
            targets = self._targets(requests, z_module)
            values, loss = targets.values, targets.loss
        prompts = build_context_prompts(self.tokenizer, requests, self.templates)
        residuals, directions = {}, {}
        for i, layer in enumerate(layers):
            keys, outputs = compute_keys(self.model, self.tokenizer, self.layout, [layer], prompts, "memit", [z_module])
            residual = (values - outputs[z_module]) / (len(layers) - i)  # R: (d, N)
            direction = self.hparams.directions(self, layer, keys[layer], independent)  # B: (d_k, N)
            residuals[layer], directions[layer] = residual, direction
            self._add_update(layer, weight_update(residual, direction))
        return residuals, directions, loss

    def _apply_spread(self, requests) -> dict:
        residuals, directions, loss = self._spread_updates(requests, independent=False)
        if getattr(self.hparams, "keeps_edited_keys", False):
            prompts = build_context_prompts(self.tokenizer, requests, self.templates)
            keys, _ = compute_keys(self.model, self.tokenizer, self.layout, self.hparams.layers, prompts, "memit")
            for layer, key in keys.items():
                product = key.double() @ key.double().T
                previous = self.key_products[layer]
                self.key_products[layer] = product if previous is None else previous + product
        return {"target_loss": loss.tolist(), "residual_norm": {l: float(r.norm()) for l, r in residuals.items()},
                **self._relative_norms(residuals, directions)}

    def _rome_factors(self, requests) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ROME/r-ROME residuals R (d, N) and directions B (d_k, N), each fact on the current model."""
        layer = self.hparams.layers[0]
        targets = self._targets(requests, self.layout.mlp(layer))
        prompts = build_context_prompts(self.tokenizer, requests, self.templates)
        name = self.layout.rewrite(layer)
        rows = read_at_subject(self.model, self.tokenizer, prompts, [name], stop_after=self.layout.block(layer))[name]
        mean_keys = average_over_templates(rows, prompts, template_weights(prompts.n_templates, "uniform"))
        denominator_keys = mean_keys if self.hparams.averaged_denominator_key else plain_rows(rows, prompts)
        weight = edited_weight(self.model, self.layout, layer).double()
        bias = edited_bias(self.model, self.layout, layer)
        current = weight @ denominator_keys.double() + (bias.double()[:, None] if bias is not None else 0)
        residual = targets.values.double() - current  # v* - (W k_d + b)
        cov = self.covariances.get(layer) if self.hparams.mom2_adjustment else None
        return residual, rome_directions(mean_keys, denominator_keys, cov), targets.loss

    def _apply_rome(self, requests) -> dict:
        """ROME edits one fact at a time; each sees the weights left by the previous one."""
        layer = self.hparams.layers[0]
        losses, residuals, directions = [], [], []
        for request in tqdm(requests, desc=self.hparams.method, disable=not self.progress or len(requests) < 2):
            residual, direction, loss = self._rome_factors([request])
            self._add_update(layer, weight_update(residual, direction))
            losses.append(float(loss[0]))
            residuals.append(residual)
            directions.append(direction)
        return {"target_loss": losses, **self._relative_norms({layer: torch.cat(residuals, 1)},
                                                              {layer: torch.cat(directions, 1)})}

    def _relative_norms(self, residuals: dict, directions: dict) -> dict[str, float]:
        """How much this batch changed the edited layers (its updates R B^T summed per layer first),
        relative to the unedited weights W, over the edited layers: relative_update_norm,
        ||dW||_F / ||W||_F; and with statistics C, relative_output_change, sqrt(tr(dW C dW^T) /
        tr(W C W^T)): the change of the layers' outputs over keys distributed as C (an update large
        only where keys never point changes little)."""
        norms = {"relative_update_norm": (sum(update_norm_squared(residuals[l], directions[l]) for l in residuals)
                                          / sum(self._original_norm(l, None) for l in residuals)) ** 0.5}
        if all(l in self.covariances for l in residuals):
            changed = sum(update_norm_squared(residuals[l], directions[l], self.covariances[l].matrix) for l in residuals)
            norms["relative_output_change"] = (changed / sum(self._original_norm(l, "C") for l in residuals)) ** 0.5
        return norms

    def _original_norm(self, layer: int, weighting: str | None) -> float:
        """||W||_F^2 (weighting None) or tr(W C W^T) ("C") of the unedited layer, computed once."""
        if (layer, weighting) not in self._original_norms:
            weight = self.original[layer].double()
            value = weight.pow(2).sum() if weighting is None else ((weight @ self.covariances[layer].matrix) * weight).sum()
            self._original_norms[(layer, weighting)] = float(value)
        return self._original_norms[(layer, weighting)]

    # ---- independent single edits ----------------------------------------------------------
    def single_edits(self, requests: Sequence[EditRequest]) -> SingleEdits:
        """Each request's edit as if it were applied alone to the current model (not applied).

        Single-layer methods compute all facts in batched passes; multi-layer spreading needs each
        fact's earlier-layer edit in place, so it runs fact by fact (and restores the weights).
        """
        if self.hparams.one_fact_at_a_time:
            residual, direction, loss = self._rome_factors(requests)
            layer = self.hparams.layers[0]
            return SingleEdits({layer: residual}, {layer: direction}, loss)
        saved = {l: t.clone() for l, t in self.total.items()}
        try:
            if len(self.hparams.layers) == 1:
                residuals, directions, loss = self._spread_updates(requests, independent=True)
                return SingleEdits(residuals, directions, loss)
            targets = self._targets(requests, self.layout.block(self.hparams.layers[-1]))
            parts = []
            for i, request in enumerate(tqdm(requests, desc="single edits", disable=not self.progress)):
                parts.append(self._spread_updates([request], False, targets.values[:, i : i + 1], targets.loss[i : i + 1]))
                self._reset_totals(saved)
            layers = self.hparams.layers
            return SingleEdits({l: torch.cat([p[0][l] for p in parts], 1) for l in layers},
                               {l: torch.cat([p[1][l] for p in parts], 1) for l in layers},
                               torch.cat([p[2] for p in parts]))
        finally:
            self._reset_totals(saved)

    def _reset_totals(self, totals: dict[int, torch.Tensor]) -> None:
        for layer, total in totals.items():
            self.total[layer] = total.clone()
            self._set_weight(layer)

    def one_at_a_time(self, requests: Sequence[EditRequest]) -> Iterator[EditRequest]:
        """Each request edited alone into the current model, all edits computed in batched passes."""
        edits = self.single_edits(requests)
        for index, request in enumerate(requests):
            with self.single_edit_applied(edits, index):
                yield request

    @contextmanager
    def single_edit_applied(self, edits: SingleEdits, index: int) -> Iterator[None]:
        """Apply fact `index` of `edits` for the duration of the block, then restore exactly."""
        saved = {l: t.clone() for l, t in self.total.items()}
        try:
            for layer in edits.residuals:
                self._add_update(layer, edits.delta(layer, index))
            yield
        finally:
            self._reset_totals(saved)
