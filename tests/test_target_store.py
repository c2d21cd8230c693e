"""The on-disk store of z: shared across sessions and methods, independent of who computes first."""

import dataclasses

import torch
from conftest import make_requests

from editlib.data.records import EditRequest
from editlib.editing.editor import Editor
from editlib.editing.target_store import TargetStore
from editlib.editing.values import optimize_targets
from editlib.methods.registry import make_hparams
from editlib.model.layout import model_layout
from editlib.model.loading import model_fingerprint

TARGETS = {"v_num_grad_steps": 6, "clamp_norm_factor": 4.0, "facts_per_chunk": 2}
TEMPLATES = ["{}", "Some words here. {}"]


def _moments(model):
    d_k = model.config.intermediate_size
    return {layer: torch.eye(d_k) for layer in range(model.config.num_hidden_layers)}


def _editor(model, tokenizer, store, method="memit", layers=(1,), **targets):
    hparams = make_hparams(method, layers=layers, targets={**TARGETS, **targets})
    return Editor(model, tokenizer, hparams, _moments(model), TEMPLATES, progress=False, target_store=store)


def test_store_is_shared_and_independent_of_request_order(tiny_llama, llama_tokenizer, tmp_path):
    pool = make_requests(6)
    fingerprint = model_fingerprint(tiny_llama)
    module = model_layout(tiny_llama).block(1)
    first = TargetStore(tmp_path, pool, fingerprint)
    z_first = _editor(tiny_llama, llama_tokenizer, first)._targets([pool[5], pool[1]], module).values
    assert (first.hits, first.misses) == (0, 2)  # blocks {4,5} and {0,1}, each computed whole
    assert len(list(tmp_path.glob("z-*.safetensors"))) == 2

    # another job (new store object, new session), another method, other facts in another order
    second = TargetStore(tmp_path, pool, fingerprint)
    z_all = _editor(tiny_llama, llama_tokenizer, second, method="emmet")._targets(pool, module).values
    assert (second.hits, second.misses) == (2, 1)  # only block {2,3} was new
    assert torch.equal(z_all[:, [5, 1]], z_first)

    # what the store holds equals a direct optimisation of the same blocks
    hparams = make_hparams("memit", layers=(1,), targets=TARGETS).targets
    for block in range(3):
        direct = optimize_targets(tiny_llama, llama_tokenizer, pool[2 * block : 2 * block + 2], TEMPLATES, module,
                                  hparams, progress=False)
        assert torch.equal(z_all[:, 2 * block : 2 * block + 2], direct.values)


def test_a_truncated_block_is_computed_again(tiny_llama, llama_tokenizer, tmp_path):
    pool = make_requests(2)
    fingerprint, module = model_fingerprint(tiny_llama), model_layout(tiny_llama).block(1)
    z = _editor(tiny_llama, llama_tokenizer, TargetStore(tmp_path, pool, fingerprint))._targets(pool, module).values
    [path] = tmp_path.glob("z-*.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # e.g. a copy of the cache that was cut short
    store = TargetStore(tmp_path, pool, fingerprint)
    again = _editor(tiny_llama, llama_tokenizer, store)._targets(pool, module).values
    assert (store.hits, store.misses) == (0, 1) and torch.equal(again, z)
    reread = TargetStore(tmp_path, pool, fingerprint)  # the rewritten block is whole again
    _editor(tiny_llama, llama_tokenizer, reread)._targets(pool, module)
    assert (reread.hits, reread.misses) == (1, 0)


def test_store_keys_follow_what_z_depends_on(tiny_llama, llama_tokenizer, tmp_path):
    pool = make_requests(4)
    module = model_layout(tiny_llama).block(1)
    store = TargetStore(tmp_path, pool, model_fingerprint(tiny_llama))
    _editor(tiny_llama, llama_tokenizer, store)._targets(pool[:2], module)
    _editor(tiny_llama, llama_tokenizer, store, v_lr=0.25)._targets(pool[:2], module)  # other hyperparameters
    _editor(tiny_llama, llama_tokenizer, store)._targets(pool[:2], model_layout(tiny_llama).block(0))  # other layer
    assert store.misses == 3
    # another model state gets other files
    other = TargetStore(tmp_path, pool, "another-model")
    _editor(tiny_llama, llama_tokenizer, other)._targets(pool[:2], module)
    assert other.misses == 1
    # a changed record changes its block's key
    changed = [dataclasses.replace(pool[0], target_new="Swedish"), *pool[1:]]
    hparams = make_hparams("memit", layers=(1,), targets=TARGETS).targets
    assert store.block_path(0, 2, module, hparams, TEMPLATES) != \
        TargetStore(tmp_path, changed, store.fingerprint).block_path(0, 2, module, hparams, TEMPLATES)
    assert store.block_path(1, 2, module, hparams, TEMPLATES) == \
        TargetStore(tmp_path, changed, store.fingerprint).block_path(1, 2, module, hparams, TEMPLATES)


def test_edited_weights_and_foreign_facts_bypass_the_store(tiny_llama, llama_tokenizer, tmp_path):
    pool = make_requests(4)
    store = TargetStore(tmp_path, pool, model_fingerprint(tiny_llama))
    editor = _editor(tiny_llama, llama_tokenizer, store)
    try:
        editor.apply(pool[:2])
        assert store.misses == 1  # the first batch, on unedited weights
        editor.apply(pool[2:])  # weights are edited now: z is optimised on them, not stored
        assert (store.hits, store.misses) == (0, 1)
        assert len(list(tmp_path.glob("z-*.safetensors"))) == 1
    finally:
        editor.restore()
    foreign = EditRequest(case_id=99, prompt="{} lives in", subject="Marcel Proust", target_new="Rome",
                          target_true="Paris")
    module = model_layout(tiny_llama).block(1)
    z = _editor(tiny_llama, llama_tokenizer, store)._targets([foreign, pool[0]], module).values  # a new session
    assert (store.hits, store.misses) == (1, 1) and torch.isfinite(z).all()
    assert len(list(tmp_path.glob("z-*.safetensors"))) == 1


def test_a_block_another_job_computes_is_read_not_recomputed(tmp_path):
    """While another job holds a block's lock, the store computes its other blocks first, then
    waits and reads the block the other job wrote."""
    import fcntl
    import threading

    from safetensors.torch import save_file

    pool = make_requests(4)
    store = TargetStore(tmp_path, pool, "fingerprint")
    hparams = make_hparams("memit", layers=(1,), targets=TARGETS).targets
    busy = store.block_path(0, 2, "m", hparams, TEMPLATES)
    computed = []

    def optimize(block):
        computed.append([r.case_id for r in block])
        return torch.full((3, len(block)), float(block[0].case_id)), torch.zeros(len(block))

    result = {}
    with open(busy.with_suffix(".lock"), "a+b") as other_job:
        fcntl.flock(other_job, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: result.update(
            z=store.targets(pool, "m", hparams, TEMPLATES, optimize)[0]))
        worker.start()
        worker.join(timeout=2)
        assert worker.is_alive() and computed == [[2, 3]]  # block 1 done, waiting for block 0
        save_file({"values": torch.full((3, 2), 7.0), "loss": torch.zeros(2)}, str(busy))
        fcntl.flock(other_job, fcntl.LOCK_UN)
    worker.join(timeout=10)
    assert computed == [[2, 3]]
    assert torch.equal(result["z"][:, :2], torch.full((3, 2), 7.0)) and torch.equal(result["z"][:, 2:], torch.full((3, 2), 2.0))
