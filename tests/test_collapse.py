"""The collapse measurements of long sequential runs: the prediction probe, each batch's weight-change
norm, and the per-batch rows of sequential_edits."""

import math

import pytest
import torch
from conftest import make_requests
from test_editing import TEMPLATES, hparams_for, subject_final_requests

from editlib.editing.editor import Editor
from editlib.eval.collapse import PredictionProbe
from editlib.model.layout import edited_weight, model_layout
from editlib.study.experiments import ExperimentContext, sequential_edits
from editlib.study.tables import STEP_COLUMNS


def test_the_probe_agrees_with_the_model_it_was_built_on_and_sees_a_collapse(trained_llama2, llama_tokenizer, corpus):
    probe = PredictionProbe(trained_llama2, llama_tokenizer, corpus[:12], max_length=16, batch_size=5)
    lengths = [min(len(ids), 16) for ids in llama_tokenizer(corpus[:12])["input_ids"]]
    assert probe.n_positions == sum(lengths) == probe.reference.numel()
    unedited = probe(trained_llama2)
    assert unedited["agreement"] == 1.0 and unedited["top_token_share"] < 0.5
    with torch.no_grad():  # equal logits everywhere: every position predicts token 0, the outputs have collapsed
        trained_llama2.lm_head.weight.zero_()
    collapsed = probe(trained_llama2)
    assert collapsed["top_token_share"] == 1.0
    assert collapsed["agreement"] == pytest.approx(float((probe.reference == 0).float().mean()))


def test_the_probe_leaves_out_the_positions_followed_by_a_skipped_token(trained_llama2, llama_tokenizer, corpus):
    texts = corpus[:6]
    rows = [ids[:16] for ids in llama_tokenizer(texts)["input_ids"]]
    skip = {rows[0][3], rows[1][5]}
    kept = [row[i + 1] not in skip if i + 1 < len(row) else True for row in rows for i in range(len(row))]
    full = PredictionProbe(trained_llama2, llama_tokenizer, texts, max_length=16, batch_size=4)
    probe = PredictionProbe(trained_llama2, llama_tokenizer, texts, max_length=16, batch_size=4, skip_next=skip)
    assert probe.n_positions == sum(kept) < full.n_positions
    assert torch.equal(probe.reference, full.reference[torch.tensor(kept)])
    assert probe(trained_llama2)["agreement"] == 1.0


def test_the_run_probe_skips_the_objects_of_the_facts_it_edits(trained_llama2, llama_tokenizer, tmp_path):
    """prediction_probe leaves out the positions where a probe text goes on with an edited fact's
    true or new object, and only those."""
    from editlib.data.corpus import corpus_of, write_corpus
    from editlib.data.records import EditRequest
    from editlib.model.tokens import target_ids
    from editlib.study.pipeline import prediction_probe

    request = EditRequest(case_id=0, prompt="{} lives in", subject="Anna", target_new="Paris", target_true="Rome")
    texts = ["Anna lives in Rome and works in Paris every day.", "Bob lives in Oslo."]
    write_corpus(tmp_path / "corpus.jsonl", corpus_of("texts", texts))
    ctx = ExperimentContext(trained_llama2, llama_tokenizer, "tiny", {}, progress=False)
    settings = {"n_texts": 2, "max_length": 32}
    probe = prediction_probe(ctx, settings, tmp_path / "corpus.jsonl", [request])
    plain = prediction_probe(ctx, settings, tmp_path / "corpus.jsonl")
    objects = {ids[0] for ids in target_ids(llama_tokenizer, ["Paris", "Rome"])}
    followed = sum(token in objects for ids in llama_tokenizer(texts)["input_ids"] for token in ids[1:])
    assert followed >= 2 and probe.n_positions == plain.n_positions - followed


def test_an_empty_probe_is_an_error(trained_llama2, llama_tokenizer):
    with pytest.raises(ValueError, match="no probe texts"):
        PredictionProbe(trained_llama2, llama_tokenizer, [])


@pytest.mark.parametrize("method,layers", [("rome", (0,)), ("memit", (0, 1)), ("alphaedit", (0,))])
def test_the_reported_update_norm_is_the_weight_change_of_the_batch(method, layers, trained_llama2, llama_tokenizer,
                                                                    moments2):
    editor = Editor(trained_llama2, llama_tokenizer, hparams_for(method, moments2, layers=layers), moments2, TEMPLATES,
                    progress=False)
    layout = model_layout(trained_llama2)
    requests = subject_final_requests(3)
    editor.apply(requests[:1])
    before = {l: edited_weight(trained_llama2, layout, l).detach().double().clone() for l in layers}
    report = editor.apply(requests[1:])  # a batch of two on top of an edit
    deltas = {l: edited_weight(trained_llama2, layout, l).double() - before[l] for l in layers}
    changed = sum(float(deltas[l].norm()) ** 2 for l in layers)
    original = sum(float(editor.original[l].double().norm()) ** 2 for l in layers)
    assert report["relative_update_norm"] == pytest.approx(math.sqrt(changed / original), rel=1e-5)
    # over keys distributed as C: tr(dW C dW^T) / tr(W C W^T)
    c = {l: moments2[l].double() for l in layers}
    out_changed = sum(float(((deltas[l] @ c[l]) * deltas[l]).sum()) for l in layers)
    out_original = sum(float(((editor.original[l].double() @ c[l]) * editor.original[l].double()).sum()) for l in layers)
    assert report["relative_output_change"] == pytest.approx(math.sqrt(out_changed / out_original), rel=1e-5)
    assert 0 < report["relative_output_change"] and 0 < report["relative_update_norm"]
    editor.close()


def test_sequential_runs_give_one_row_per_batch_with_the_probe(trained_llama2, llama_tokenizer, moments2, corpus):
    ctx = ExperimentContext(trained_llama2, llama_tokenizer, "tiny", moments2, progress=False)
    probe = PredictionProbe(trained_llama2, llama_tokenizer, corpus[:8], max_length=16)
    spec = hparams_for("memit", moments2)
    _, _, steps = sequential_edits(ctx, make_requests(6), spec, batch_size=2, total_edits=6, eval_at=[6], probe=probe)
    assert list(steps.columns) == STEP_COLUMNS
    assert steps["n_edits"].tolist() == [2, 4, 6] and steps["step"].tolist() == [1, 2, 3]
    assert (steps["relative_update_norm"] > 0).all() and (steps["relative_output_change"] > 0).all()
    assert steps["agreement"].between(0, 1).all() and steps["top_token_share"].between(0, 1).all()
    assert probe(trained_llama2)["agreement"] == 1.0  # the run left the model unedited
    _, _, unprobed = sequential_edits(ctx, make_requests(6), spec, batch_size=2, total_edits=6, eval_at=[6])
    assert unprobed["agreement"].isna().all()
    assert unprobed["relative_update_norm"].tolist() == pytest.approx(steps["relative_update_norm"].tolist())
