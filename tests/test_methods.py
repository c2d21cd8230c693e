"""The method registry: an extra method, defined here and registered at run time, runs through
every experiment and config validation without a change to any other file."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_requests

from editlib.editing.session import EditSession
from editlib.methods import registry as registry
from editlib.methods.registry import Method, get_method, method_names
from editlib.model.layout import model_layout
from editlib.model.tokens import target_batch, target_nll
from editlib.study.config import ConfigError, load_schema, validate_config
from editlib.study.experiments import ExperimentContext, batched_edits, sequential_edits, single_edits
from editlib.study.pipeline import edit_spec

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
NAME = "ft-extra"


@dataclass(frozen=True)
class FineTuneSpec:
    layers: tuple[int, ...]
    lr: float = 0.05
    steps: int = 25
    method: str = NAME

    def to_dict(self) -> dict:
        return asdict(self)


class FineTuneSession(EditSession):
    """Plain fine-tuning of one layer's MLP output projection on the edit prompts."""

    def __init__(self, model, tokenizer, spec: FineTuneSpec):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.weight = model.get_submodule(model_layout(model).rewrite(spec.layers[0])).weight
        self.original = self.weight.detach().clone()
        self.n_edits = 0

    def apply(self, requests) -> dict:
        batch = target_batch(self.tokenizer, [r.text for r in requests], [r.target_new for r in requests])
        self.weight.requires_grad_(True)
        optimizer = torch.optim.Adam([self.weight], lr=self.spec.lr)
        try:
            for _ in range(self.spec.steps):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss = target_nll(logits, batch.labels).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            self.weight.requires_grad_(False)
        self.n_edits += len(requests)
        return {"loss": float(loss.detach())}

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)
        self.n_edits = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().clone(), "n_edits": torch.tensor(self.n_edits)}

    def load_state_dict(self, state) -> None:
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        self.n_edits = int(state["n_edits"])


@pytest.fixture
def extra_method(monkeypatch):
    method = Method(name=NAME, spec=lambda hyperparameters, layers, _: FineTuneSpec(layers=layers, **hyperparameters),
                    open=lambda ctx, spec: FineTuneSession(ctx.model, ctx.tokenizer, spec))
    monkeypatch.setitem(registry.METHODS, NAME, method)
    return method


def test_the_schema_names_exactly_the_registered_methods():
    schema = load_schema(SCHEMA)
    assert schema["$defs"]["method_name"] == {"enum": method_names()}
    assert {"rome", "r-rome", "memit", "emmet", "alphaedit", "grace", "mend"} <= set(method_names())


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(get_method("memit"))


def test_an_extra_method_runs_through_every_experiment(extra_method, trained_llama2, llama_tokenizer):
    model = trained_llama2
    requests = make_requests(4)
    original = {name: p.detach().clone() for name, p in model.state_dict().items()}
    ctx = ExperimentContext(model, llama_tokenizer, "tiny", {}, progress=False)
    spec = edit_spec({"methods": {NAME: {"steps": 25}}}, NAME, (1,))
    assert spec == FineTuneSpec(layers=(1,), steps=25)

    single = single_edits(ctx, requests, spec)
    assert single["method"].tolist() == [NAME] and single.loc[0, "ES"] == 100.0

    batched, _ = batched_edits(ctx, requests, spec, [1, 2])
    assert batched["batch_size"].tolist() == [1, 2]
    assert batched.loc[0, "ES"] == single.loc[0, "ES"]  # batches of one are single edits

    sequential, _, _ = sequential_edits(ctx, requests, spec, batch_size=2, total_edits=4)
    so_far = sequential[sequential["scope"] == "edited_so_far"]
    assert so_far["n_edits"].tolist() == [2, 4] and (so_far["method"] == NAME).all()
    assert so_far["ES"].iloc[0] == 100.0

    for name, tensor in model.state_dict().items():  # every experiment left the model unedited
        assert torch.equal(tensor, original[name]), name


def test_config_validation_accepts_an_extra_method(extra_method):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["methods"][NAME] = {"layers": [0], "steps": 5}
    config["experiments"]["sequential"]["methods"].append(NAME)
    validate_config(copy.deepcopy(config), SCHEMA)
    config["methods"][NAME]["stepz"] = 5
    with pytest.raises(ConfigError, match=rf"methods\.{NAME}: unknown hyperparameter 'stepz'"):
        validate_config(config, SCHEMA)


def test_an_unregistered_method_is_a_config_error():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["methods"][NAME] = {"layers": [0]}
    with pytest.raises(ConfigError, match=rf"methods\.{NAME}: not a registered method"):
        validate_config(config, SCHEMA)


def _probe(model, tokenizer) -> list[dict]:
    """A stand-in downstream task: the summed next-token log-probabilities after the edit prompts."""
    prompts = [r.text for r in make_requests(4)]
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        rows.append({"task": prompt, "metric": "logprob_sum", "value": float(logits.log_softmax(-1).sum()), "stderr": 0.0})
    return rows


@pytest.mark.parametrize("method", ["memit", "alphaedit", "grace", "mend"])
def test_saved_states_reload_the_edited_model_exactly(method, trained_llama2, llama_tokenizer, corpus, tmp_path):
    """The downstream stage loads each state an editing job saved onto the unedited model; its
    rows must equal those computed on the edited model in memory, bit for bit."""
    from editlib.editing.statistics import collect_second_moments
    from editlib.methods.mend import MendHparams
    from editlib.methods.mend.editor import MendEditor
    from editlib.study.experiments import states_downstream

    model = trained_llama2
    moments = {layer: m.mean for layer, m in collect_second_moments(
        model, llama_tokenizer, model_layout(model), [0, 1], corpus, progress=False).items()}
    ctx = ExperimentContext(model, llama_tokenizer, "tiny", moments, progress=False)
    targets = {"targets": {"v_num_grad_steps": 5}}
    if method == "memit":
        spec = edit_spec({"methods": {method: {"mom2_update_weight": 1.0, **targets}}}, method, (0, 1))
    elif method == "alphaedit":
        threshold = float(torch.linalg.eigvalsh(moments[1].double())[96])
        spec = edit_spec({"methods": {method: {"nullspace_threshold": threshold, "l2": 1e-2, **targets}}}, method, (1,))
    elif method == "grace":
        spec = edit_spec({"methods": {method: {"n_iter": 5}}}, method, (1,))
    else:
        MendEditor.fresh(model, llama_tokenizer, MendHparams(n_edit_layers=1, rank=8)).save(tmp_path / "mend.safetensors")
        spec = edit_spec({"methods": {method: {}}}, method, (), tmp_path / "mend.safetensors")
    states = {n: tmp_path / f"n{n}.safetensors" for n in (2, 4)}
    _, in_memory, _ = sequential_edits(ctx, make_requests(4), spec, batch_size=2, total_edits=4, downstream=_probe,
                                    downstream_at=[2, 4], states=states)
    reloaded = states_downstream(ctx, spec, [states[2], states[4]], _probe)
    edited = in_memory[in_memory["n_edits"] > 0].reset_index(drop=True)
    assert reloaded[["n_edits", "task"]].equals(edited[["n_edits", "task"]])
    assert reloaded["value"].tolist() == edited["value"].tolist()
    unedited = in_memory.loc[in_memory["n_edits"] == 0, "value"].tolist()
    assert reloaded.loc[reloaded["n_edits"] == 4, "value"].tolist() != unedited  # the edits are there
