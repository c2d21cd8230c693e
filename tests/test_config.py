"""Config validation: every invalid value is rejected up front, naming the field and what is allowed.

The Snakefile runs `validate_config` before any job (test_workflow checks that path end to end);
here each case mutates the shipped default config and expects ConfigError with the field's name.
"""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from editlib.study.config import ConfigError, validate_config
from editlib.study.stages import toy_record_count

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))


def _set(path: str, value):
    def mutate(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


def _drop(path: str):
    def mutate(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


INVALID = {
    "unknown method": (_set("experiments.sequential.methods", ["memit", "memitt"]),
                       r"experiments\.sequential\.methods\[1\]: method 'memitt' has no entry under 'methods'"),
    "missing field": (_drop("stats.n_samples"), r"stats: 'n_samples' is a required property"),
    "negative size": (_set("experiments.single.n_records", -1), r"experiments\.single\.n_records: -1 is less than"),
    "zero batch size": (_set("experiments.batched.batch_sizes", [0, 4]), r"experiments\.batched\.batch_sizes\[0\]"),
    "unknown device": (_set("model.device", "gpu"), r"model\.device: 'gpu' does not match"),
    "unknown dtype": (_set("model.dtype", "float8"), r"model\.dtype: 'float8' is not one of"),
    "sweep layer without an MLP": (_set("experiments.layer_sweep.layers", [0, 3]),
                                   r"layer_sweep\.layers\[1\]: layer 3 out of range for the toy model, whose MLPs are in layers 0\.\.1"),
    "method layer beyond the model": (_set("methods.memit.layers", [0, 9]), r"methods\.memit\.layers\[1\]: layer 9"),
    "GRACE layer beyond the model": (_set("methods.grace.layers", [5]),
                                     r"methods\.grace\.layers\[0\]: layer 5 out of range for a 5-layer model"),
    "auto layers without a sweep": (_set("experiments.layer_sweep.methods", ["rome"]),
                                    r"methods\.r-rome\.layers: 'auto' .* not in experiments\.layer_sweep\.methods"),
    "batch larger than the records": (_set("experiments.batched.batch_sizes", [1, 2048]),
                                      rf"batched\.batch_sizes\[1\]: 2048 exceeds experiments\.batched\.n_records {DEFAULT['experiments']['batched']['n_records']}"),
    "more records than the world has": (_set("experiments.batched.n_records", 5000),
                                        r"experiments\.batched\.n_records: 5000 records needed, the toy world .* 1200"),
    "more edits than the world has": (_set("experiments.sequential.total_edits", 2000),
                                      r"experiments\.sequential\.total_edits: 2000 records needed"),
    "sequential batch above the total": (_set("experiments.sequential.batch_sizes", [1, 256]),
                                         r"sequential\.batch_sizes\[1\]: 256 exceeds total_edits 128"),
    "evaluation after the last edit": (_set("experiments.sequential.eval_at", [1, 256]),
                                       r"sequential\.eval_at\[1\]: 256 exceeds total_edits 128"),
    "downstream after the last edit": (_set("experiments.sequential.downstream_at", [0, 999]),
                                       r"sequential\.downstream_at\[1\]"),
    "batch sizes of a method that is not run": (_set("experiments.sequential.method_batch_sizes", {"r-rome": [1]}),
                                                r"method_batch_sizes\.r-rome: 'r-rome' is not in"),
    "unknown downstream task": (_set("downstream.tasks", ["toy_facts", "mmlu"]),
                                r"downstream\.tasks\[1\]: 'mmlu' is not a task of data\.source 'toyworld'.*include_defaults"),
    "negative mu": (_set("methods.memit.mom2_update_weight", -1.0), r"methods\.memit\.mom2_update_weight: -1\.0 must be > 0"),
    "zero learning rate": (_set("methods.rome.targets", {"v_lr": 0.0}), r"methods\.rome\.targets\.v_lr: 0\.0 must be > 0"),
    "negative l2": (_set("methods.alphaedit.l2", -1.0), r"methods\.alphaedit\.l2: -1\.0 must be >= 0"),
    "zero GRACE radius": (_set("methods.grace.eps", 0.0), r"methods\.grace\.eps: 0\.0 must be > 0"),
    "unknown hyperparameter": (_set("methods.memit.mom2_weight", 1.0), r"methods\.memit: memit does not read the hyperparameter 'mom2_weight'; it reads \[.*'mom2_update_weight'"),
    "hyperparameter of another method": (_set("methods.rome.l2", 3.0), r"methods\.rome: rome does not read the hyperparameter 'l2'; it reads \[.*'mom2_adjustment'"),
    "hyperparameters of other methods": (_set("methods.rome", {"layers": "auto", "l2": 3.0, "emmet_lambda": 5.0}),
                                         r"methods\.rome: rome does not read the hyperparameters 'emmet_lambda', 'l2'"),
    "MEMIT with AlphaEdit's value": (_set("methods.memit.nullspace_threshold", 0.1), r"methods\.memit: memit does not read the hyperparameter 'nullspace_threshold'"),
    "unknown target hyperparameter": (_set("methods.emmet.targets", {"v_steps": 3}), r"methods\.emmet: emmet: targets does not read the target hyperparameter 'v_steps'"),
    "unknown MEND hyperparameter": (_set("methods.mend.hparams", {"rnak": 3}), r"methods\.mend\.hparams: unknown field\(s\) \['rnak'\]; allowed: .*'rank'"),
    "MEND training beyond the world": (_set("methods.mend.n_train", 1200),
                                       r"methods\.mend: n_train \+ n_eval = 1230 records beyond the first 256"),
    "toy model MLP layers": (_set("model.train.mlp_layers", 9), r"model\.train: mlp_layers must be in \[1, layers=5\]"),
    "unknown toy model field": (_set("model.train.depth", 9), r"model\.train: unknown field\(s\) \['depth'\]; allowed: .*'layers'"),
    "toy world fraction": (_set("data.world.edit_fraction", 1.5), r"data\.world: edit_fraction must be in \(0, 1\)"),
    "unknown GRACE hyperparameter": (_set("methods.grace.radius", 1.0), r"methods\.grace: grace does not read the hyperparameter 'radius'"),
    "MEND edit hyperparameter": (_set("methods.mend.lr", 1.0), r"methods\.mend: mend does not read \['lr'\]: its edit has no hyperparameters"),
    "layer sweep of MEND": (_set("experiments.layer_sweep.methods", ["rome", "r-rome", "memit", "emmet", "alphaedit", "mend"]),
                            r"layer_sweep\.methods\[5\]: mend edits the layers of its own design"),
    "unregistered method block": (_set("methods.memitt", {"layers": [0]}), r"methods\.memitt: not a registered method"),
    "variant of an unknown method": (_set("methods.memit-deep", {"method": "memitt", "layers": [0]}),
                                     r"methods\.memit-deep\.method: 'memitt' is not one of"),
    "registered block re-pointed": (_set("methods.memit.method", "emmet"), r"methods\.memit\.method: a block named after"),
    "variant of MEND": (_set("methods.mend-2", {"method": "mend"}), r"methods\.mend-2: mend is trained once"),
    "ablation of a method not run sequentially": (_set("ablations", {"edited_layers": [{"shallow": "rome", "deep": "r-rome"}]}),
                                                  r"ablations\.edited_layers\[0\]\.deep: 'r-rome' is not in experiments\.sequential"),
    "ablation of an unknown model": (_set("ablations", {"model_size": [{"smaller": "toy-5L", "larger": "toy-big"}]}),
                                     r"ablations\.model_size\[0\]\.larger: 'toy-big' is not a configured model"),
    "batch-size ablation with one batch size": (_set("ablations", {"batch_size": ["rome"]}),
                                                r"ablations\.batch_size\[0\]: 'rome' must be in .* at least two batch sizes"),
    "model variant named like the model": (_set("models", {"toy-5L": {"train": {"hidden": 64}}}),
                                           r"models: a variant takes model\.name 'toy-5L'"),
    "model variant with an unknown training field": (_set("models", {"toy-x": {"train": {"hiden": 64}}}),
                                                     r"config\.yaml: models\.toy-x merged over model: model\.train: unknown field\(s\) \['hiden'\]"),
    "model variant too shallow for a method's layer": (_set("models", {"toy-2L": {"train": {"layers": 2, "local_layers": 1, "mlp_layers": 1}}}),
                                                       r"models\.toy-2L merged over model: experiments\.layer_sweep\.layers\[1\]: layer 1 out of range .* layers 0\.\.0"),
    "sensitivity of an unknown hyperparameter": (_set("experiments.sensitivity", {"n_records": 8, "grid": {"memit": {"mom2_weight": [1]}}}),
                                                 r"experiments\.sensitivity\.grid\.memit\.mom2_weight\[0\]: memit does not read the hyperparameter 'mom2_weight'"),
    "sensitivity of a negative value": (_set("experiments.sensitivity", {"n_records": 8, "grid": {"alphaedit": {"l2": [1, -1]}}}),
                                        r"experiments\.sensitivity\.grid\.alphaedit\.l2\[1\]"),
    "sensitivity batch larger than its records": (_set("experiments.sensitivity", {"n_records": 8, "batch_sizes": [1, 16], "grid": {"memit": {"mom2_update_weight": [1]}}}),
                                                  r"experiments\.sensitivity\.batch_sizes\[1\]: batch size 16 exceeds n_records 8"),
    "sensitivity of GRACE": (_set("experiments.sensitivity", {"n_records": 8, "grid": {"grace": {"eps": [1]}}}),
                             r"experiments\.sensitivity\.grid\.grace: the sensitivity stage sweeps locate-and-edit"),
    "samples beyond the world's records": (_set("experiments.sequential.samples", 10),
                                           r"experiments\.sequential\.total_edits \(x samples\): 1280 records needed, the toy world .* 1200"),
    # 128 batches of one edit, each rescoring all facts edited so far: 1 + 2 + ... + 128 records
    "a long sequential run without eval_at": (_drop("experiments.sequential.eval_at"),
                                              r"experiments\.sequential\.eval_at: required when a run has more than 64 batches: "
                                              r"alphaedit at batch size 1 has 128, .* takes 8,256 record scorings .* eval_at: \[1, 2, 4, 8, 16, 32, 64, 128\]"),
    "negative checkpoint interval": (_set("experiments.sequential.checkpoint_minutes", -1),
                                     r"experiments\.sequential\.checkpoint_minutes: -1 is less than the minimum of 0"),
    "empty model revision": (_set("model.revision", ""), r"model\.revision: '' should be non-empty"),
    "zero GRACE iterations": (_set("methods.grace.n_iter", 0), r"methods\.grace\.n_iter: 0 must be > 0"),
    "zero MEND training steps": (_set("methods.mend.hparams", {"steps": 0}), r"methods\.mend\.hparams\.steps: 0 must be > 0"),
    "zero target steps": (_set("methods.memit.targets", {"v_num_grad_steps": 0}), r"methods\.memit\.targets\.v_num_grad_steps: 0 must be > 0"),
    "zero toy training steps": (_set("model.train.steps", 0), r"model\.train: train: steps must be an integer >= 1, got 0"),
    "toy recall threshold above one": (_set("model.train.recall_threshold", 1.5),
                                       r"model\.train: train: recall_threshold must be in \[0, 1\], got 1\.5"),
    "figure range upside down": (_set("figures", {"y_limits": {"ES": [100, 0]}}),
                                 r"figures\.y_limits\.ES: \[100, 0\] must be \[lo, hi\] with lo < hi"),
    "empty figure range": (_set("figures", {"y_limits": {"accuracy": [0.5, 0.5]}}), r"figures\.y_limits\.accuracy: \[0\.5, 0\.5\]"),
    "figure range of an unknown metric": (_set("figures", {"y_limits": {"EX": [0, 100]}}),
                                          r"figures\.y_limits: Additional properties are not allowed \('EX' was unexpected\)"),
    "figure range of one number": (_set("figures", {"y_limits": {"S": [0]}}), r"figures\.y_limits\.S: \[0\] is too short"),
}


def test_only_the_figures_job_reads_the_figures_block():
    from editlib.study.stages import stage_config

    config = copy.deepcopy(DEFAULT)
    assert stage_config(config, "figures") == stage_config(config, "report")  # none configured: as before
    config["figures"] = {"y_limits": {"S": [50, 100]}}
    assert validate_config(config, SCHEMA) is config
    assert stage_config(config, "figures")["figures"] == {"y_limits": {"S": [50, 100]}}
    assert "figures" not in stage_config(config, "report")  # the findings job


def test_a_model_variant_names_only_what_differs():
    from editlib.study.stages import model_config, model_names, stage_config

    config = copy.deepcopy(DEFAULT)
    config["models"] = {"toy-5L-wide": {"train": {"hidden": 192, "intermediate": 768}}}
    validate_config(config, SCHEMA)
    assert model_names(config) == ["toy-5L", "toy-5L-wide"]
    wide = model_config(config, "toy-5L-wide")
    assert wide["model"]["name"] == "toy-5L-wide" and "models" not in wide
    assert wide["model"]["train"] == {**DEFAULT["model"]["train"], "hidden": 192, "intermediate": 768}
    assert model_config(config, "toy-5L")["model"] == DEFAULT["model"]
    # each model's jobs read their own block: the variant's training differs, the methods' do not
    assert stage_config(wide, "prepare_model")["model"]["train"]["hidden"] == 192
    assert stage_config(wide, "single", "memit")["methods"] == stage_config(config, "single", "memit")["methods"]


def test_a_variant_runs_its_method_under_its_own_name():
    from editlib.study.stages import configured_method, method_overrides, stage_config, statistics_layers

    config = copy.deepcopy(DEFAULT)
    config["methods"]["memit-deep"] = {"method": "memit", "layers": [0, 1], "mom2_update_weight": 3.0}
    config["experiments"]["single"]["methods"].append("memit-deep")
    validate_config(config, SCHEMA)
    assert configured_method(config, "memit-deep").name == "memit"
    assert method_overrides(config, "memit-deep") == {"mom2_update_weight": 3.0}
    assert stage_config(config, "single", "memit-deep")["methods"] == {"memit-deep": config["methods"]["memit-deep"]}
    assert {0, 1} <= set(statistics_layers(config))


def test_the_shipped_configs_are_valid():
    for path in (REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))):
        validate_config(yaml.safe_load(path.read_text(encoding="utf-8")), SCHEMA, source=path.name)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_is_rejected_naming_the_field(case):
    mutate, message = INVALID[case]
    config = copy.deepcopy(DEFAULT)
    mutate(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA, source="config.yaml")
    assert str(error.value).startswith("config.yaml: ")
    assert re.search(message, str(error.value)), str(error.value)


def test_toy_record_count_is_what_the_data_stage_writes(tmp_path):
    from editlib.data.records import load_requests
    from editlib.toy.world import build_world

    world = {"seed": 3, "n_subjects": 40, "edit_fraction": 0.5, "facts_per_edit_subject": 3}
    build_world(tmp_path, **world)
    config = {"data": {"source": "toyworld", "world": world}}
    assert toy_record_count(config) == len(load_requests(tmp_path / "counterfact.json"))


@pytest.mark.parametrize("config_file", ["config.yaml", "configs/smollm2.yaml", "configs/llama2-7b.yaml"])
def test_checking_a_config_imports_no_torch(config_file):
    """The Snakefile checks the config on every snakemake call (`-n` included): the registry and
    the hyperparameter dataclasses it builds must not pull in torch or transformers (seconds of
    imports per call)."""
    import subprocess
    import sys

    code = ("import sys, yaml\n"
            "from editlib.study.config import validate_config\n"
            f"config = yaml.safe_load(open({str(REPO / config_file)!r}))\n"
            f"validate_config(config, {str(SCHEMA)!r})\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------- layers against the model's depth


def _paper_config(name: str = "llama3-8b.yaml") -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text(encoding="utf-8"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A Hugging Face cache and hub stand-in: `cached` / `remote` map repo ids to config.json fields;
    `errors` maps repo ids to the exception a download raises; `calls` records (repo, revision)."""
    import huggingface_hub

    state = {"cached": {}, "remote": {}, "errors": {}, "calls": []}

    def write(fields):
        path = tmp_path / f"config{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(fields), encoding="utf-8")
        return str(path)

    def try_to_load_from_cache(repo, filename, revision=None, **kwargs):
        state["calls"].append(("cache", repo, revision))
        return write(state["cached"][repo]) if repo in state["cached"] else None

    def hf_hub_download(repo, filename, revision=None, **kwargs):
        state["calls"].append(("download", repo, revision))
        if repo in state["errors"]:
            raise state["errors"][repo]
        return write(state["remote"][repo])

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", try_to_load_from_cache)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return state


def _hub_model(config: dict, path: str, **extra) -> dict:
    config["model"] = {**config["model"], "path": path, **extra}
    return config


def test_hub_layers_are_checked_against_the_table_of_paper_models(hub):
    config = _paper_config()
    config["experiments"]["layer_sweep"]["layers"] = list(range(33))
    with pytest.raises(ConfigError, match=r"llama3-8b\.yaml: experiments\.layer_sweep\.layers\[32\]: layer 32 out of range "
                                          r"for meta-llama/Meta-Llama-3-8B, a 32-layer model per editlib\.model\.architectures"
                                          r".*allowed: 0\.\.31"):
        validate_config(config, SCHEMA, source="llama3-8b.yaml")
    assert ("download", "meta-llama/Meta-Llama-3-8B", None) not in hub["calls"]  # no network for the table's models
    config = _paper_config("llama2-13b.yaml")  # 40 layers: GRACE may use layer 39, not 40
    config["methods"]["grace"]["layers"] = [39]
    validate_config(config, SCHEMA)
    config["methods"]["grace"]["layers"] = [40]
    with pytest.raises(ConfigError, match=r"methods\.grace\.layers\[0\]: layer 40 out of range for meta-llama/Llama-2-13b-hf, "
                                          r"a 40-layer model"):
        validate_config(config, SCHEMA)


def test_hub_layers_are_checked_against_the_cached_config(hub):
    hub["cached"]["Qwen/Qwen2.5-7B"] = {"num_hidden_layers": 28, "model_type": "qwen2"}
    config = _hub_model(_paper_config(), "Qwen/Qwen2.5-7B")
    with pytest.raises(ConfigError, match=r"experiments\.layer_sweep\.layers\[28\]: layer 28 out of range for Qwen/Qwen2\.5-7B, "
                                          r"a 28-layer model per the Hugging Face cache's config\.json"):
        validate_config(config, SCHEMA)
    assert not [call for call in hub["calls"] if call[0] == "download"]


def test_hub_layers_are_checked_against_the_downloaded_config_at_the_revision(hub):
    hub["remote"]["EleutherAI/gpt-j-6b"] = {"n_layer": 28, "model_type": "gptj"}
    config = _hub_model(_paper_config(), "EleutherAI/gpt-j-6b", revision="f98c709")
    config["experiments"]["layer_sweep"]["layers"] = list(range(28))
    config["methods"]["memit-5layer"]["layers"] = [30, 31]
    with pytest.raises(ConfigError, match=r"methods\.memit-5layer\.layers\[0\]: layer 30 out of range for "
                                          r"EleutherAI/gpt-j-6b@f98c709, a 28-layer model per the hub's config\.json"):
        validate_config(config, SCHEMA)
    assert ("cache", "EleutherAI/gpt-j-6b", "f98c709") in hub["calls"]
    assert ("download", "EleutherAI/gpt-j-6b", "f98c709") in hub["calls"]
    # a pinned revision of a paper model is not what the table describes: its config.json is read
    hub["remote"]["meta-llama/Meta-Llama-3-8B"] = {"num_hidden_layers": 2}
    with pytest.raises(ConfigError, match=r"layer_sweep\.layers\[2\]: layer 2 out of range for meta-llama/Meta-Llama-3-8B@abc"):
        validate_config(_hub_model(_paper_config(), "meta-llama/Meta-Llama-3-8B", revision="abc"), SCHEMA)


def test_a_gated_or_unknown_hub_model_is_reported_before_any_job(hub):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    gated = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(gated, "401 gated")
    hub["errors"]["meta-llama/Llama-3.1-8B"] = gated
    with pytest.raises(ConfigError, match=r"model\.path: 'meta-llama/Llama-3\.1-8B' is a gated model: accept its licence "
                                          r"on https://huggingface\.co/meta-llama/Llama-3\.1-8B and log in "
                                          r"\(`huggingface-cli login`, or set HF_TOKEN\)"):
        validate_config(_hub_model(_paper_config(), "meta-llama/Llama-3.1-8B"), SCHEMA)
    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(missing, "404")
    hub["errors"]["meta-llama/Llama-9-8B"] = missing
    with pytest.raises(ConfigError, match=r"model\.path: no hub model 'meta-llama/Llama-9-8B'"):
        validate_config(_hub_model(_paper_config(), "meta-llama/Llama-9-8B"), SCHEMA)


def test_an_unreachable_hub_skips_the_depth_check_with_a_warning(hub):
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub["errors"]["Qwen/Qwen2.5-7B"] = LocalEntryNotFoundError("no connection")
    config = _hub_model(_paper_config(), "Qwen/Qwen2.5-7B")
    config["experiments"]["layer_sweep"]["layers"] = [40]
    with pytest.warns(UserWarning, match=r"model\.path: the hub cannot be reached for 'Qwen/Qwen2\.5-7B'.*not checked"):
        validate_config(config, SCHEMA)


def test_smollm2_layers_are_checked_against_its_30_layers():
    config = yaml.safe_load((REPO / "configs" / "smollm2.yaml").read_text(encoding="utf-8"))
    config["experiments"]["layer_sweep"]["layers"] = [1, 29, 30]
    with pytest.raises(ConfigError, match=r"experiments\.layer_sweep\.layers\[2\]: layer 30 out of range for "
                                          r"SmolLM2-135M-Instruct \(30 layers\)"):
        validate_config(config, SCHEMA)


def test_the_model_revision_reaches_the_prepare_model_stage(hub):
    from editlib.study.stages import model_config, stage_config

    config = _hub_model(_paper_config(), "meta-llama/Meta-Llama-3-8B", revision="62bd457b6fe961a42a631306577e622c83876cb6")
    config["models"] = {"Llama-3-8B-main": {"revision": "main"}}
    hub["remote"]["meta-llama/Meta-Llama-3-8B"] = {"num_hidden_layers": 32}
    validate_config(config, SCHEMA)
    assert stage_config(config, "prepare_model")["model"]["revision"] == "62bd457b6fe961a42a631306577e622c83876cb6"
    assert stage_config(model_config(config, "Llama-3-8B-main"), "prepare_model")["model"]["revision"] == "main"
    with pytest.raises(ConfigError, match=r"models\.bad: .*'revision' was unexpected|models\.bad\.revision"):
        config["models"] = {"bad": {"revision": 3}}
        validate_config(config, SCHEMA)


# ---------------------------------------------------------------------------- counts and rates

# (config field, a value out of range): each count >= 1, each rate > 0 (or >= 0, or in [0, 1])
OUT_OF_RANGE = [
    *[(f"methods.memit.targets.{name}", value) for name in ("v_num_grad_steps", "facts_per_chunk") for value in (0, -1)],
    *[(f"methods.memit.targets.{name}", value) for name in ("v_lr", "clamp_norm_factor") for value in (0.0, -0.5)],
    *[(f"methods.memit.targets.{name}", -0.5) for name in ("v_weight_decay", "kl_factor", "early_stop_loss")],
    *[(f"methods.alphaedit.{name}", 0.0) for name in ("mom2_update_weight", "nullspace_threshold")],
    *[(f"methods.emmet.{name}", -1.0) for name in ("emmet_lambda", "update_norm_lambda", "l2")],
    ("methods.grace.n_iter", 0), ("methods.grace.n_iter", -3), ("methods.grace.eps", 0.0), ("methods.grace.edit_lr", -1.0),
    *[(f"methods.mend.hparams.{name}", value) for name in ("n_edit_layers", "rank", "steps", "batch_size", "n_locality",
                                                           "log_every") for value in (0, -1)],
    *[(f"methods.mend.hparams.{name}", 0.0) for name in ("edit_lr", "lr", "lr_lr", "grad_clip")],
    *[(f"methods.mend.hparams.{name}", -1) for name in ("n_hidden", "c_edit", "c_loc")],
    ("methods.mend.n_train", 0), ("methods.mend.n_eval", 0),
    *[(f"model.train.{name}", 0) for name in ("layers", "hidden", "intermediate", "heads", "vocab_size", "steps", "batch_size",
                                             "seq_len", "bucket_batches", "max_position_embeddings", "threads",
                                             "eval_batch_size")],
    ("model.train.lr", 0.0), ("model.train.dialogue_lr", 0.0), ("model.train.warmup_steps", -1),
    ("model.train.weight_decay", -0.1), ("model.train.min_lr_ratio", 1.5), ("model.train.recall_threshold", -0.1),
    *[(f"experiments.{path}", 0) for path in ("layer_sweep.n_records", "single.n_records", "batched.n_records",
                                              "sequential.total_edits", "sequential.samples")],
    ("stats.n_samples", 0), ("tracing.n_facts", 0), ("tracing.n_samples", 0), ("tracing.window", 0), ("threads", 0),
    ("data.world.n_subjects", 0),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in OUT_OF_RANGE])
def test_a_count_or_rate_out_of_range_is_rejected_naming_it(field, value):
    config = copy.deepcopy(DEFAULT)
    *parents, last = field.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA, source="config.yaml")
    message = str(error.value)
    parent = ".".join(parents)
    # the field is named: by its full path, or by its block and its own name
    assert field in message or (parent in message and re.search(rf"\b{last}\b", message)), message


def test_the_checkpoint_interval_is_not_a_parameter_of_the_sequential_jobs():
    """How often a run writes its checkpoint changes none of its numbers: changing it reruns no job."""
    from editlib.study.stages import stage_config

    changed = copy.deepcopy(DEFAULT)
    changed["experiments"]["sequential"]["checkpoint_minutes"] = 0
    validate_config(changed, SCHEMA)
    for method in DEFAULT["experiments"]["sequential"]["methods"]:
        assert stage_config(changed, "sequential", method) == stage_config(DEFAULT, "sequential", method)
    assert "eval_at" in stage_config(DEFAULT, "sequential", "rome")["experiments"]["sequential"]
