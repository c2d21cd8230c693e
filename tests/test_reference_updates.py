"""editlib's ROME and MEMIT weight updates against a plain transcription of the reference code,
on the real SmolLM2-135M, fact by fact, with the same C, context templates and hyperparameters.

The reference side is written here from the published algorithms (docs/methods.md §2-§5), one
fact and one layer at a time with explicit loops: ROME's compute_u / compute_v and rank-one update
(kmeng01/rome `rome_main.py`), MEMIT's keys, covariance-weighted solve and residual spread over
layers (kmeng01/memit `memit_main.py`), and the target optimisation of both (tests/reference_z.py,
hooked at the MLP output for ROME and at the last edited block for MEMIT). editlib computes the
same edits with its batched code (editlib.editing.editor.Editor). Target vectors are compared directly;
the weight updates are compared given identical targets (the reference's, fed to editlib), so the
check isolates the update rules.
"""

from __future__ import annotations

import json

import pytest
import torch
from reference_z import reference_z

from editlib.data.packaged import prepare_smollm2
from editlib.data.records import EditRequest
from editlib.editing.editor import Editor
from editlib.editing.values import TargetResult
from editlib.methods.registry import make_hparams
from editlib.model.layout import model_layout

pytestmark = pytest.mark.slow

REQUESTS = [
    EditRequest(case_id=0, prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(case_id=1, prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
    EditRequest(case_id=2, prompt="{} plays the", subject="Marcel Proust", target_new="guitar"),
]
# the plain prompt first, then prefixes (one group: MEMIT weights the plain prompt 1/2)
TEMPLATES = ["{}", "The weather is nice today. {}", "Here is a fact. {}", "In the news: {}", "I read that {}"]
TARGETS = {"v_num_grad_steps": 12, "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0, "kl_factor": 0.0625}
ROME_LAYER, MEMIT_LAYERS = 4, (2, 3, 4)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from test_assets import ASSET_CACHE, real_asset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = real_asset(prepare_smollm2, ASSET_CACHE, tmp_path_factory.mktemp("smollm2") / "model")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


@pytest.fixture(scope="module")
def second_moments(smollm2, tmp_path_factory):
    """C = mean k k^T at each edited layer's down_proj input over ~2,500 tokens of the toy world's
    wiki text, plus a small ridge so that C is positive definite (d_k 1,536); both sides use it."""
    from editlib.toy.world import build_world

    model, tokenizer = smollm2
    world = tmp_path_factory.mktemp("world")
    build_world(world, seed=0, n_subjects=60)
    texts = [json.loads(line)["text"] for line in (world / "wiki.jsonl").read_text().splitlines()]
    layout = model_layout(model)
    sums, count = {}, 0
    handles = []
    for layer in sorted({ROME_LAYER, *MEMIT_LAYERS}):
        def hook(module, args, layer=layer):
            keys = args[0][0].double()
            sums[layer] = sums.get(layer, 0) + keys.T @ keys
        handles.append(model.get_submodule(layout.rewrite(layer)).register_forward_pre_hook(hook))
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            model.model(input_ids=ids)
            count += ids.shape[1]
            if count > 2500:
                break
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    for layer, total in sums.items():
        mean = total / count
        moments[layer] = (mean + 1e-4 * mean.diagonal().mean() * torch.eye(len(mean), dtype=mean.dtype)).float()
    return moments


def subject_last(tokenizer, template: str, request: EditRequest) -> tuple[str, int]:
    """The text of `template` around the request's prompt, and its subject's last token index."""
    prompt = template.format(request.prompt)
    head = prompt[: prompt.index("{}")] + request.subject
    return prompt.replace("{}", request.subject), len(tokenizer(head)["input_ids"]) - 1


def module_io(model, tokenizer, module: str, text: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of `module` at token `index` of `text` (one forward, no batching)."""
    seen = {}

    def hook(mod, args, output):
        seen["in"] = args[0][0, index].double().clone()
        out = output[0] if isinstance(output, tuple) else output
        seen["out"] = out[0, index].double().clone()

    handle = model.get_submodule(module).register_forward_hook(hook)
    try:
        model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def reference_key(model, tokenizer, layer: int, request: EditRequest, weights: list[float]) -> torch.Tensor:
    """The down_proj input at the subject's last token, averaged over TEMPLATES with `weights`."""
    rewrite = model_layout(model).rewrite(layer)
    total = 0
    for template, weight in zip(TEMPLATES, weights):
        text, index = subject_last(tokenizer, template, request)
        total = total + weight * module_io(model, tokenizer, rewrite, text, index)[0]
    return total


def reference_rome_delta(model, tokenizer, request, value, cov) -> torch.Tensor:
    """ROME: u = C^-1 k_bar (k_bar uniform over the templates), normalised; k* and W k* at the
    plain prompt; right = (v* - W k*) / (k* . u); Delta = right u^T."""
    rewrite = model_layout(model).rewrite(ROME_LAYER)
    k_bar = reference_key(model, tokenizer, ROME_LAYER, request, [1 / len(TEMPLATES)] * len(TEMPLATES))
    u = torch.linalg.solve(cov.double(), k_bar)
    u = u / u.norm()
    text, index = subject_last(tokenizer, "{}", request)
    k_star, w_k_star = module_io(model, tokenizer, rewrite, text, index)
    right = (value.double() - w_k_star) / torch.dot(k_star, u)
    return torch.outer(right, u)


def reference_memit_deltas(model, tokenizer, requests, values, moments, mom2_weight) -> dict[int, torch.Tensor]:
    """MEMIT: for each layer in turn (earlier layers already updated), keys averaged 1/2 plain
    prompt + 1/2 mean of the prefixed ones, residual z - h(last layer) at the plain prompt spread as
    1/(layers left), Delta = R ((mu C + K K^T)^-1 K)^T. Applies and then removes the updates."""
    layout = model_layout(model)
    weights = [0.5] + [0.5 / (len(TEMPLATES) - 1)] * (len(TEMPLATES) - 1)
    z_module = layout.block(MEMIT_LAYERS[-1])
    deltas, originals = {}, {}
    try:
        for i, layer in enumerate(MEMIT_LAYERS):
            keys = torch.stack([reference_key(model, tokenizer, layer, r, weights) for r in requests], dim=1)
            current = torch.stack([module_io(model, tokenizer, z_module, *subject_last(tokenizer, "{}", r))[1]
                                   for r in requests], dim=1)
            residual = (values.double() - current) / (len(MEMIT_LAYERS) - i)
            adjusted = torch.linalg.solve(mom2_weight * moments[layer].double() + keys @ keys.T, keys)
            deltas[layer] = residual @ adjusted.T
            weight = model.get_submodule(layout.rewrite(layer)).weight
            originals[layer] = weight.detach().clone()
            weight.data += deltas[layer].to(weight.dtype)
    finally:
        for layer, original in originals.items():
            model.get_submodule(layout.rewrite(layer)).weight.data.copy_(original)
    return deltas


def reference_values(model, tokenizer, module: str, hparams) -> tuple[torch.Tensor, list[float]]:
    pairs = [reference_z(model, tokenizer, r, TEMPLATES, module, hparams.targets) for r in REQUESTS]
    return torch.stack([value for value, _ in pairs], dim=1), [loss for _, loss in pairs]


def with_targets(editor: Editor, values: torch.Tensor) -> Editor:
    """Feed `values` (d, N over REQUESTS) to the editor as its target vectors."""
    index = {r.case_id: i for i, r in enumerate(REQUESTS)}

    def targets(requests, hook_module):
        columns = values[:, [index[r.case_id] for r in requests]].float()
        return TargetResult(values=columns, h_init=columns.new_zeros(0), loss=columns.new_zeros(len(requests)),
                            nll=columns.new_zeros(0), steps=columns.new_zeros(0))

    editor._targets = targets
    return editor


def test_rome_matches_the_reference_fact_by_fact(smollm2, second_moments):
    model, tokenizer = smollm2
    layout = model_layout(model)
    hparams = make_hparams("rome", layers=[ROME_LAYER], targets=TARGETS)
    values, _ = reference_values(model, tokenizer, layout.mlp(ROME_LAYER), hparams)
    editor = Editor(model, tokenizer, hparams, second_moments, TEMPLATES, progress=False)
    ours = editor._optimize(REQUESTS, layout.mlp(ROME_LAYER)).values
    for i in range(len(REQUESTS)):
        print(f"\nROME z of fact {i}: relative difference {relative(ours[:, i], values[:, i]):.2e}")
        assert relative(ours[:, i], values[:, i]) < 1e-3, f"target vector of fact {i}"
    with_targets(editor, values)
    for i, request in enumerate(REQUESTS):
        editor.restore()
        editor.apply([request])
        ours_delta = editor.total[ROME_LAYER].clone()
        editor.restore()
        expected = reference_rome_delta(model, tokenizer, request, values[:, i], second_moments[ROME_LAYER])
        print(f"ROME update of fact {i}: relative difference {relative(ours_delta, expected):.2e}, "
              f"norm {float(expected.norm()):.3f}")
        assert relative(ours_delta, expected) < 1e-3, f"ROME update of fact {i}: {relative(ours_delta, expected):.2e}"
    editor.restore()


def test_memit_matches_the_reference_on_a_batch(smollm2, second_moments):
    model, tokenizer = smollm2
    layout = model_layout(model)
    hparams = make_hparams("memit", layers=list(MEMIT_LAYERS), targets=TARGETS, mom2_update_weight=15000.0)
    values, _ = reference_values(model, tokenizer, layout.block(MEMIT_LAYERS[-1]), hparams)
    editor = Editor(model, tokenizer, hparams, second_moments, TEMPLATES, progress=False)
    ours = editor._optimize(REQUESTS, layout.block(MEMIT_LAYERS[-1])).values
    for i in range(len(REQUESTS)):
        print(f"\nMEMIT z of fact {i}: relative difference {relative(ours[:, i], values[:, i]):.2e}")
        assert relative(ours[:, i], values[:, i]) < 1e-3, f"target vector of fact {i}"
    expected = reference_memit_deltas(model, tokenizer, REQUESTS, values, second_moments, 15000.0)
    with_targets(editor, values)
    editor.apply(REQUESTS)
    try:
        for layer in MEMIT_LAYERS:
            difference = relative(editor.total[layer], expected[layer])
            print(f"MEMIT update at layer {layer}: relative difference {difference:.2e}, norm {float(expected[layer].norm()):.3f}")
            assert difference < 1e-3, f"MEMIT update at layer {layer}: {difference:.2e}"
            assert expected[layer].norm() > 0
    finally:
        editor.restore()
