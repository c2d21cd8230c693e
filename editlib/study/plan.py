"""Resource plan of a config: every job Snakemake would run, with its estimated peak GPU memory,
host memory, disk written and time on the target GPU, and the run's GPU-hours.

    python -m editlib.study.plan --config configs/llama3-8b.yaml [--profile workflow/profiles/slurm]

Torch-free: estimates come from the model's dimensions (editlib.model.architectures.HUB_ARCHITECTURES,
or the config.json of a prepared/cached model) and the experiment sizes, never from running it.

NO GPU MEASUREMENT EXISTS FOR THIS PROJECT YET. Time = FLOPs / (the GPU's datasheet peak rate for
the dtype x an assumed utilisation), or, for small-batch passes that are bound by reading the
weights, bytes read / (datasheet memory bandwidth x an assumed utilisation), whichever is larger.
The peak rates are NVIDIA's H100 SXM5 80 GB datasheet numbers (dense, without sparsity); the
utilisations are assumptions, named in ASSUMED_UTILISATION. The CPU timings in docs/performance.md
are measured, but on the toy model on CPU, and are not used here. Token counts per prompt and per
downstream task are assumptions too (PROMPT_TOKENS, TASKS). Treat every number as an estimate to
size SLURM requests with margin, and replace the assumptions by measurements from the first jobs'
benchmark files (benchmarks/<run>/...).

All formulas are in this module's "formulas" section except the statistics' memory terms, which
are the statistics job's own (editlib.editing.statistics_memory.statistics_memory).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from editlib.editing.statistics_memory import DTYPE_BYTES, StatisticsMemory, statistics_memory
from editlib.model.architectures import HUB_ARCHITECTURES, parameter_count
from editlib.study.config import validate_config
from editlib.study.stages import (
    CHECKPOINT_MINUTES,
    configured_method,
    method_overrides,
    model_config,
    model_names,
    sensitivity_methods,
    sequential_runs,
    state_points,
    statistics_layers,
    trained_editor_block,
)

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
GIB = 2 ** 30

# ---------------------------------------------------------------------------- rules

# Rules whose job loads the model (their pipeline function calls load_configured_model or
# load_context): each needs a GPU (gres gpu:1 in the SLURM profile). tests/test_plan.py checks
# this set against the rule scripts and editlib.study.pipeline, so it cannot drift silently.
MODEL_RULES = frozenset({"statistics", "causal_trace", "layer_sweep", "sensitivity", "train_mend", "single_edits",
                         "batched_edits", "sequential_edits", "downstream_base", "downstream_batched",
                         "downstream_sequential"})
# Rules that load the model only for some configs, and when: the SLURM profile (for the paper
# configs) gives them no GPU.
CONDITIONAL_MODEL_RULES = {"prepare_data": "data.source qa_wikidata or country_facts with data.known_filter (the SmolLM2 configs)"}
# Rules that resume when rerun (Snakemake's `retries` reruns them): sequential runs from their
# checkpoint, downstream jobs from the edit states they had evaluated.
RESUMABLE_RULES = frozenset({"sequential_edits", "downstream_sequential", "downstream_batched"})
# Jobs of one run (not per model)
RUN_RULES = ("tidy_results", "figures", "findings")

# ---------------------------------------------------------------------------- the GPU and assumptions


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what the device reports (nvidia-smi)
    tflops: dict  # dense peak TFLOP/s by precision (datasheet)
    bandwidth_tbs: float  # memory bandwidth, TB/s (datasheet)


# NVIDIA H100 SXM5 80 GB datasheet (dense, no sparsity): FP64 tensor core 67, FP32 67 (no tensor
# cores), TF32 tensor core 494.5, BF16/FP16 tensor core 989.5 TFLOP/s; HBM3 3.35 TB/s. 81,559 MiB.
H100 = Gpu("NVIDIA H100 SXM5 80 GB", 79.6, {"fp64": 67.0, "fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}, 3.35)
# Assumed fractions of those peaks (not measured): large matrix products reach about half of the
# tensor-core peak in practice; transformer forward/backward passes of moderate batches less.
ASSUMED_UTILISATION = {"matmul": 0.35, "solve": 0.5, "bandwidth": 0.6}
# Memory no estimate below counts: CUDA context, allocator fragmentation (GiB)
GPU_OVERHEAD_GIB = 3.0
# Host memory of a job besides what it loads (python, torch, CUDA libraries, tokenizer, lm-eval
# datasets), plus one safetensors shard staged while loading (GiB)
HOST_BASE_GIB = 12.0
# Assumed network rate of downloads (hub snapshot, corpus), bytes/s
DOWNLOAD_RATE = 100e6
# Assumed tokens (Llama tokenizers): a scored prompt with its target; a context template prefix
# plus subject; the part of a prompt after the subject's last token (with the target)
PROMPT_TOKENS = {"scored": 18, "prefix": 14, "suffix": 8, "wiki_article": 700, "trace": 12}
# Scored prompts per record and targets per prompt: CounterFact 1 rewrite + 2 paraphrase + 10
# neighbourhood prompts, each scored for the new and the true object; ZsRE rewrite, paraphrase,
# locality, one target each. CounterFact has 10 generation prompts per record (GE, 100 tokens).
SCORED_PROMPTS = {"counterfact": 13 * 2, "zsre": 3}
GENERATION_PROMPTS, GENERATED_TOKENS, GENERATION_BATCH = 10, 100, 16
SCORING_ROWS = 64  # editlib.eval.metrics.edit_scores max_rows
# Records the causal-trace job filters for facts the model knows: CounterFact's 21,919; ZsRE's
# (MEND's evaluation split) 19,086
KNOWN_FILTER_RECORDS = {"counterfact": 21919, "zsre": 19086}


@dataclass(frozen=True)
class Task:
    """An lm-eval task as the plan sizes it: subtasks, documents per subtask (before `limit`),
    requests per document, mean context tokens, the longest sequence of a batch (context and
    generation), decode steps per batch (0: loglikelihood; a batch runs until its longest
    generation stops)."""

    subtasks: int
    docs: int
    requests: int
    tokens: int
    max_tokens: int
    generated: int = 0


# lm-eval 0.4 tasks of the paper configs; sizes are the tasks' evaluation splits, token counts
# assumed (Llama tokenizers, each task's own few-shot setting as the paper configs keep it: bbh
# 3-shot chain of thought, generating up to 1,024 tokens until "Q" or a blank line; mbpp 3-shot;
# mbpp and hendrycks_math generate up to 256)
TASKS = {
    "mmlu": Task(57, 246, 4, 150, 1024),
    "commonsense_qa": Task(1, 1221, 5, 40, 128),
    "bbh": Task(27, 241, 1, 1500, 2600, generated=400),
    "hendrycks_math": Task(7, 714, 1, 150, 1024, generated=256),
    "tydiqa_goldp": Task(1, 5077, 1, 400, 1024, generated=32),
    "tydiqa_goldp_en": Task(1, 440, 1, 400, 1024, generated=32),
    "mbpp": Task(1, 500, 1, 600, 1200, generated=256),
    "sst2": Task(1, 872, 2, 30, 128),
    "mrpc": Task(1, 408, 2, 60, 160),
    "rte": Task(1, 277, 2, 80, 300),
    "cola": Task(1, 1043, 2, 20, 64),
}
UNKNOWN_TASK = Task(1, 1000, 1, 256, 1024, generated=64)  # a local or unlisted task

# ---------------------------------------------------------------------------- formulas


@dataclass(frozen=True)
class Dims:
    """A model's dimensions as the formulas use them."""

    params: int
    hidden: int  # d
    intermediate: int  # d_k (the rewrite module's input)
    layers: int
    vocab: int
    kv: int  # width of keys/values (grouped-query attention)
    dtype_bytes: int
    rate: float  # FLOP/s of its matrix products at ASSUMED_UTILISATION["matmul"]
    precision: str
    hub_bytes: int  # the weights as stored on the hub

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def layer_params(self) -> int:
        return (self.params - 2 * self.vocab * self.hidden) // self.layers

    def params_above(self, layer: int) -> int:
        """Parameters of the blocks from `layer` up, plus the output matrix."""
        return (self.layers - layer) * self.layer_params + self.vocab * self.hidden


def dims(arch: dict, dtype: str, tf32: bool = True, gpu: Gpu = H100) -> Dims:
    precision = {"float32": "tf32" if tf32 else "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    d = arch["hidden_size"]
    return Dims(parameter_count(arch), d, arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"],
                d * arch.get("num_key_value_heads", arch["num_attention_heads"]) // arch["num_attention_heads"],
                DTYPE_BYTES[dtype], gpu.tflops[precision] * 1e12 * ASSUMED_UTILISATION["matmul"], precision,
                parameter_count(arch) * DTYPE_BYTES[arch.get("dtype", dtype)])


@dataclass
class Cost:
    """Seconds on the GPU, summed over components; each component is bound by its FLOPs or by
    reading the weights (small batches), whichever takes longer."""

    seconds: float = 0.0
    flops: float = 0.0

    def add(self, flops: float, rate: float, bytes_read: float = 0.0, gpu: Gpu = H100) -> "Cost":
        bandwidth = gpu.bandwidth_tbs * 1e12 * ASSUMED_UTILISATION["bandwidth"]
        self.seconds += max(flops / rate, bytes_read / bandwidth)
        self.flops += flops
        return self


PROBE_BATCH = 16  # texts per forward pass of editlib.eval.collapse.PredictionProbe (its default batch_size)


def forward_flops(m: Dims, tokens: float, params: int | None = None) -> float:
    """2 FLOPs per parameter per token (attention over short contexts neglected)."""
    return 2.0 * (params if params is not None else m.params) * tokens


def activation_bytes(m: Dims, tokens: float, layers: int) -> float:
    """What a backward pass through `layers` blocks keeps per token (no weight gradients): the
    inputs of the norms, attention and the gated MLP's nonlinearity, about 4d + 3d_k values."""
    return tokens * layers * (4 * m.hidden + 3 * m.intermediate) * 4


def statistics_plan(m: Dims, n_layers: int, batch_tokens: int, acc_dtype: str, layers_per_pass: int | None = None,
                    gpu: Gpu = H100) -> StatisticsMemory:
    """The statistics job's memory terms and layers per pass on `gpu`: the formula the job itself
    uses to group its layers (editlib.editing.statistics_memory.statistics_memory), with the GPU's memory less
    GPU_OVERHEAD_GIB as what it may use."""
    model_dtype = {"tf32": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[m.precision]
    return statistics_memory(intermediate_size=m.intermediate, hidden_size=m.hidden, n_layers=n_layers,
                             batch_tokens=batch_tokens, model_bytes=m.weight_bytes, model_dtype=model_dtype,
                             acc_dtype=acc_dtype, available_bytes=int((gpu.memory_gib - GPU_OVERHEAD_GIB) * GIB),
                             layers_per_pass=layers_per_pass)


@dataclass(frozen=True)
class Editing:
    """What one configured method block costs per fact and per batch."""

    kind: str  # locate | adaptor | hypernetwork
    layers: tuple[int, ...]  # () for auto: one layer, the lowest (layer 0) assumed
    rows_per_fact: int = 0  # context prompts + the KL prompt
    steps: int = 0  # target optimisation (or GRACE) steps
    facts_per_chunk: int = 32
    solve: str = ""  # least_squares | rank_one | null_space | "" (no statistics)
    uses_statistics: bool = False

    @property
    def n_layers(self) -> int:
        return len(self.layers) or 1

    @property
    def lowest(self) -> int:
        return min(self.layers) if self.layers else 0


def editing(config: dict, block: str) -> Editing:
    """The cost model of a method block: a trained hypernetwork ("hypernetwork", MEND), a locate-and-edit
    method ("locate", with its solve: "rank_one" ROME, "least_squares" MEMIT/EMMET, "null_space"
    AlphaEdit), or an adaptor trained per edit ("adaptor", GRACE), from its registry entry
    and hyperparameter class."""
    from editlib.editing.hparams import LocateEditHparams
    from editlib.methods.registry import make_spec

    layers = config["methods"][block].get("layers", "auto")
    layers = tuple(layers) if isinstance(layers, list) else ()
    method = configured_method(config, block)
    if method.trained_editor:
        return Editing("hypernetwork", tuple(range(config["methods"][block].get("hparams", {}).get("n_edit_layers", 2))))
    hp = make_spec(method.name, method_overrides(config, block), layers[:1] or (0,))
    if not isinstance(hp, LocateEditHparams):
        return Editing("adaptor", layers, rows_per_fact=1, steps=hp.n_iter)
    templates = 1 + sum(count for _, count in hp.context_lengths)
    solve = "rank_one" if hp.one_fact_at_a_time else ("null_space" if getattr(hp, "keeps_edited_keys", False) else "least_squares")
    if not hp.needs_statistics:
        solve = ""
    return Editing("locate", layers, templates + 1, hp.targets.v_num_grad_steps, hp.targets.facts_per_chunk, solve,
                   method.uses_statistics)


def edit_cost(m: Dims, e: Editing, facts: int, batches: int, cost: Cost) -> Cost:
    """Computing and applying the edits of `facts` facts in `batches` batches (each batch's
    targets on the model as it is then, chunks of facts_per_chunk facts per pass)."""
    if e.kind == "hypernetwork":  # one forward and backward of the edit prompts, the hypernetwork's step
        return cost.add(3 * forward_flops(m, facts * PROMPT_TOKENS["scored"]), m.rate, 2 * batches * m.weight_bytes)
    above = m.params_above(e.lowest if e.kind == "locate" else min(e.layers))
    if e.kind == "adaptor":  # n_iter Adam steps per edit through the layers above the wrapped one
        tokens = facts * e.steps * PROMPT_TOKENS["scored"]
        return cost.add(3 * forward_flops(m, tokens, above), m.rate, 2 * facts * e.steps * above * m.dtype_bytes)
    chunks = batches * max(1, math.ceil(facts / batches / e.facts_per_chunk))
    rows = facts * e.rows_per_fact
    # the prefixes and the keys: forward passes of every context prompt (once)
    cost.add(2 * forward_flops(m, rows * PROMPT_TOKENS["prefix"]), m.rate, 2 * chunks * m.weight_bytes)
    # Adam steps: forward and backward of the suffix tokens through the blocks above the layer
    cost.add(3 * forward_flops(m, rows * PROMPT_TOKENS["suffix"] * e.steps, above), m.rate,
             2 * chunks * e.steps * above * m.dtype_bytes)
    solve_rate = H100.tflops["fp64" if e.solve == "null_space" else "fp32"] * 1e12 * ASSUMED_UTILISATION["solve"]
    d_k3 = float(m.intermediate) ** 3
    if e.solve in ("least_squares", "null_space"):  # a d_k x d_k solve per batch and layer
        cost.add(2 * d_k3 * batches * e.n_layers, solve_rate)
    if e.solve == "null_space":  # the null-space projector: an eigendecomposition per layer
        cost.add(9 * d_k3 * e.n_layers, solve_rate)
    if e.solve == "rank_one":  # C^-1 once per layer
        cost.add(2 * d_k3, solve_rate)
    return cost


def edit_gpu_bytes(m: Dims, e: Editing) -> float:
    """Weights, the edited layers' C and update buffers, and the target optimisation's largest
    chunk (activations of the suffix tokens through the blocks above the layer, logits of the
    target tokens)."""
    total = m.weight_bytes
    per_layer = 2 * m.hidden * m.intermediate * 4  # the original weight and the accumulated update, fp32
    if e.uses_statistics:
        per_layer += m.intermediate ** 2 * 4  # C
    if e.solve == "null_space":
        per_layer += m.intermediate ** 2 * (4 + 8)  # the projector and the fp64 key product
    total += per_layer * e.n_layers
    if e.solve:  # one layer's solve at a time: its matrix and factorisation
        total += 2 * m.intermediate ** 2 * (8 if e.solve == "null_space" else 4)
    if e.kind == "locate":
        rows = e.facts_per_chunk * e.rows_per_fact
        total += activation_bytes(m, rows * PROMPT_TOKENS["suffix"], m.layers - e.lowest)
        total += rows * 4 * m.vocab * 4 * 3  # target-token logits, their softmax and gradient
        total += rows * PROMPT_TOKENS["prefix"] * m.layers * 2 * m.kv * m.dtype_bytes  # the prefix cache
    elif e.kind == "adaptor":
        total += activation_bytes(m, PROMPT_TOKENS["scored"], m.layers - min(e.layers))
    return total


def state_bytes(m: Dims, e: Editing, n_edits: int) -> float:
    """A saved edit state (safetensors): each edited layer's fp32 update (and AlphaEdit's fp64
    key product), GRACE's codebook (a key of d_k and a value of d per edit), MEND's edited weights."""
    if e.kind == "adaptor":
        return n_edits * (m.intermediate + m.hidden) * 4
    size = e.n_layers * m.hidden * m.intermediate * 4
    if e.solve == "null_space":
        size += e.n_layers * m.intermediate ** 2 * 8
    return size


def scoring_cost(m: Dims, kind: str, records: float, passes: float, generation: bool, cost: Cost) -> Cost:
    """Teacher-forced scoring of `records` records in `passes` separate scorings (each at least
    one pass over the weights), plus generation entropy of their generation prompts."""
    tokens = records * SCORED_PROMPTS[kind] * PROMPT_TOKENS["scored"]
    reads = max(passes, records * SCORED_PROMPTS[kind] / SCORING_ROWS)
    cost.add(forward_flops(m, tokens), m.rate, reads * m.weight_bytes)
    if generation and kind == "counterfact":
        prompts = records * GENERATION_PROMPTS
        steps = max(passes, prompts / GENERATION_BATCH) * GENERATED_TOKENS
        cost.add(forward_flops(m, prompts * (GENERATED_TOKENS + PROMPT_TOKENS["scored"])), m.rate, steps * m.weight_bytes)
    return cost


def downstream_cost(m: Dims, settings: dict, evaluations: int, cost: Cost) -> tuple[Cost, float]:
    """lm-eval over the configured tasks, `evaluations` times: loglikelihood requests (context
    tokens x 2 x params FLOPs), generation (one pass over the weights per generated token per
    batch). Returns the cost and the largest batch's activation bytes."""
    limit, batch = settings.get("limit"), settings.get("batch_size", 16)
    peak = 0.0
    for name in settings.get("tasks", []):
        task = TASKS.get(name, UNKNOWN_TASK)
        docs = task.subtasks * (min(limit, task.docs) if limit else task.docs)
        tokens = docs * task.requests * task.tokens * evaluations
        if task.generated:
            steps = math.ceil(docs / batch) * task.generated * evaluations
            cost.add(forward_flops(m, tokens + docs * task.generated * evaluations), m.rate, steps * m.weight_bytes)
            peak = max(peak, batch * task.max_tokens * m.layers * 2 * m.kv * m.dtype_bytes + batch * m.vocab * 4 * 4)
        else:
            cost.add(forward_flops(m, tokens), m.rate, math.ceil(docs * task.requests / batch) * evaluations * m.weight_bytes)
            peak = max(peak, batch * task.max_tokens * m.vocab * 4 * 2)  # logits and their log-softmax
    return cost, peak


# ---------------------------------------------------------------------------- jobs


@dataclass
class Job:
    rule: str
    wildcards: dict
    gpu_gib: float = 0.0  # 0: no GPU
    host_gib: float = HOST_BASE_GIB
    disk_gib: float = 0.0
    hours: float = 0.0
    attempts: int = 1
    notes: list = field(default_factory=list)
    resume_unit_min: float | None = None  # the most work a killed attempt loses (None: the checkpoint interval)

    @property
    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.wildcards.items()) or "-"


def architecture(config: dict, model_dir: Path | None = None) -> dict:
    """The config.json fields of the model: HUB_ARCHITECTURES for a paper model, the toy model's
    training config, a model folder's config.json, or a hub model's in the Hugging Face cache."""
    model = config["model"]
    if model["source"] == "hub" and model.get("path") in HUB_ARCHITECTURES:
        return HUB_ARCHITECTURES[model["path"]]
    if model["source"] == "toyworld":
        from editlib.toy.recipe import TrainConfig

        t = TrainConfig(**model.get("train", {}))
        return {"hidden_size": t.hidden, "intermediate_size": t.intermediate, "num_hidden_layers": t.layers,
                "num_attention_heads": t.heads, "num_key_value_heads": t.heads, "vocab_size": t.vocab_size,
                "dtype": model.get("dtype", "float32")}
    for folder in (model_dir, model.get("path")):
        if folder and (Path(folder) / "config.json").is_file():
            return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if model["source"] == "hub":  # a hub model downloaded before: its config.json in the Hugging Face cache
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model["path"], "config.json", revision=model.get("revision", "main"))
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8"))
    raise ValueError(f"config model: the plan knows no architecture for {model.get('path') or model['name']!r}; add "
                     f"its config.json fields to editlib.model.architectures.HUB_ARCHITECTURES, or prepare the model first "
                     f"(snakemake --until prepare_model) so that {model_dir or 'its folder'} holds its config.json")


def plan_jobs(config: dict, gpu: Gpu = H100) -> list[Job]:
    """Every job of `config`, in the order of the rules, with its estimates."""
    jobs: list[Job] = []
    for model in model_names(config):
        jobs += model_jobs(model_config(config, model), model, gpu)
    jobs += [Job(rule, {}, hours=0.05, host_gib=2.0) for rule in RUN_RULES]
    return jobs


def _needs(config: dict, attribute: str) -> list[str]:
    """The method blocks of the single, batched and sequential jobs whose method has `attribute`."""
    experiments = config["experiments"]
    blocks = [*experiments["single"]["methods"], *experiments["batched"]["methods"],
              *[m for m, _, _ in sequential_runs(config)]]
    return [b for b in blocks if getattr(configured_method(config, b), attribute)]


def model_jobs(config: dict, model: str, gpu: Gpu = H100) -> list[Job]:
    prepared = Path("resources") / config["run"] / model / "model"  # the workflow's model folder (rules/common.smk)
    m = dims(architecture(config, prepared), config["model"].get("dtype", "float32"), config["model"].get("tf32", True), gpu)
    kind = config["data"].get("records", "counterfact") if config["data"]["source"] != "toyworld" else "counterfact"
    generation = config["metrics"].get("generation_entropy", False)
    experiments = config["experiments"]
    w = {"model": model}
    gib = lambda n: n / GIB  # noqa: E731
    base_gpu = m.weight_bytes + GPU_OVERHEAD_GIB * GIB
    jobs = []

    # preparation: the model (a hub snapshot into the cache) and the data (downloads; no model for the paper configs)
    hub = config["model"]["source"] == "hub"
    jobs.append(Job("prepare_model", dict(w), host_gib=4.0, disk_gib=gib(m.hub_bytes) if hub else 0.0,
                    hours=m.hub_bytes / DOWNLOAD_RATE / 3600 if hub else 0.1,
                    notes=["downloads the hub snapshot into the Hugging Face cache"] if hub else []))
    corpus_bytes = 0.0
    if str(config["stats"].get("corpus", "")).startswith("hf:"):
        corpus_bytes = config["stats"]["n_samples"] * PROMPT_TOKENS["wiki_article"] * 4 * 8  # articles streamed ~8x sampled
    loads = config["data"]["source"] in ("qa_wikidata", "country_facts") and config["data"].get("known_filter", True)
    jobs.append(Job("prepare_data", dict(w), host_gib=8.0, disk_gib=gib(corpus_bytes / 8 + 0.5e9),
                    hours=0.25 + corpus_bytes / DOWNLOAD_RATE / 3600,
                    notes=["loads the model (data.known_filter) but has no GPU in the SLURM profile"] if loads else []))

    # statistics: one or more passes over the corpus, a Gram matrix per layer
    stat_layers = statistics_layers(config)
    uses_stats = bool(experiments["layer_sweep"]["methods"] or sensitivity_methods(config) or _needs(config, "uses_statistics"))
    if uses_stats:
        stats = config["stats"]
        acc_dtype = stats.get("dtype", "float32")
        batch_tokens = stats.get("batch_tokens", 8192)
        memory = statistics_plan(m, len(stat_layers), batch_tokens, acc_dtype, stats.get("layers_per_pass"), gpu)
        per_pass, passes = memory.group_size, memory.passes
        tokens = stats["n_samples"] * min(PROMPT_TOKENS["wiki_article"], stats["max_length"])
        cost = Cost().add(passes * forward_flops(m, tokens) + 4 * m.layers * m.hidden * tokens * min(
            PROMPT_TOKENS["wiki_article"], stats["max_length"]) / 2 * passes, m.rate)
        gram_rate = gpu.tflops["fp64" if acc_dtype == "float64" else "fp32"] * 1e12 * ASSUMED_UTILISATION["matmul"]
        cost.add(2 * tokens * m.intermediate ** 2 * len(stat_layers), gram_rate)  # TF32 off for the Grams
        c_bytes = len(stat_layers) * m.intermediate ** 2 * 4
        jobs.append(Job("statistics", dict(w), gpu_gib=gib(memory.peak_bytes + GPU_OVERHEAD_GIB * GIB),
                        host_gib=HOST_BASE_GIB + gib(2 * c_bytes), disk_gib=gib(2 * c_bytes), hours=cost.seconds / 3600,
                        notes=[f"{len(stat_layers)} layers, {passes} pass(es) of {per_pass} layers"]))
    c_layer = m.intermediate ** 2 * 4

    # causal tracing: known facts among the records, then 3 kinds x 2 tokens x L restorations per chunk of facts
    tracing = config["tracing"]
    rows = tracing["n_facts"] * (tracing["n_samples"] + 1)
    passes = 3 * 2 * m.layers
    cost = Cost().add(forward_flops(m, rows * PROMPT_TOKENS["trace"] * passes), m.rate,
                      math.ceil(tracing["n_facts"] / 16) * passes * m.weight_bytes)
    records = KNOWN_FILTER_RECORDS.get(kind, 0)  # the known-fact filter: one prompt per record
    cost.add(forward_flops(m, records * PROMPT_TOKENS["scored"]), m.rate, records / SCORING_ROWS * m.weight_bytes)
    jobs.append(Job("causal_trace", dict(w), gpu_gib=gib(base_gpu + activation_bytes(m, 16 * 11 * PROMPT_TOKENS["trace"], 1)),
                    hours=cost.seconds / 3600))

    blocks = {b: editing(config, b) for b in config["methods"]}

    # MEND's hypernetwork
    if _needs(config, "trained_editor"):
        hp = config["methods"][trained_editor_block(config)].get("hparams", {})
        n_layers, rank, steps, batch = hp.get("n_edit_layers", 2), hp.get("rank", 1920), hp.get("steps", 300), hp.get("batch_size", 4)
        hyper = n_layers * 2 * (m.hidden + m.intermediate) * rank
        tokens = steps * batch * 3 * PROMPT_TOKENS["scored"]  # edit, post-edit and locality prompts
        cost = Cost().add(3 * forward_flops(m, tokens), m.rate, steps * 6 * m.weight_bytes)
        gpu_bytes = base_gpu + hyper * 4 * 4 + n_layers * m.hidden * m.intermediate * 4 * 3 + \
            batch * 3 * PROMPT_TOKENS["scored"] * m.vocab * 4 * 3 + activation_bytes(m, batch * 3 * PROMPT_TOKENS["scored"], m.layers)
        jobs.append(Job("train_mend", dict(w), gpu_gib=gib(gpu_bytes), disk_gib=gib(hyper * 4), hours=cost.seconds / 3600,
                        notes=[f"{steps} steps of {batch} edits"]))

    def edit_job(rule, wildcards, block, facts, batches, scorings, score_passes, ge_records, disk=0.0, note=None):
        e = blocks[block]
        cost = edit_cost(m, e, facts, batches, Cost())
        scoring_cost(m, kind, scorings, score_passes, False, cost)
        if generation and ge_records and kind == "counterfact":
            cost.add(forward_flops(m, ge_records * GENERATION_PROMPTS * (GENERATED_TOKENS + PROMPT_TOKENS["scored"])), m.rate,
                     max(score_passes, ge_records * GENERATION_PROMPTS / GENERATION_BATCH) * GENERATED_TOKENS * m.weight_bytes)
        host = HOST_BASE_GIB + (gib(c_layer * e.n_layers) if e.uses_statistics else 0.0)
        return Job(rule, wildcards, gpu_gib=gib(edit_gpu_bytes(m, e) + GPU_OVERHEAD_GIB * GIB), host_gib=host,
                   disk_gib=gib(disk), hours=cost.seconds / 3600, notes=[note] if note else [])

    sweep = experiments["layer_sweep"]
    for block in sweep["methods"]:
        n, layers = sweep["n_records"], len(sweep["layers"])
        job = edit_job("layer_sweep", {**w, "method": block}, block, n * layers, n * layers, n * layers, n * layers, 0)
        job.host_gib += gib(c_layer * (layers - 1))  # every swept layer's C
        jobs.append(job)
    sens = experiments.get("sensitivity", {})
    for block in sensitivity_methods(config):
        values = len(next(iter(sens["grid"][block].values())))
        n = sens["n_records"] * values * len(sens.get("batch_sizes", [1]))
        jobs.append(edit_job("sensitivity", {**w, "method": block}, block, n, n, n, n, 0))
    for block in experiments["single"]["methods"]:
        n = experiments["single"]["n_records"]
        jobs.append(edit_job("single_edits", {**w, "method": block}, block, n, n, n, n, 0))
    batched = experiments["batched"]
    for block in batched["methods"]:
        sizes = batched["batch_sizes"]
        n = batched.get("n_records", max(sizes))
        facts = sum(n - n % b for b in sizes)
        n_batches = sum(n // b for b in sizes)
        states = sum(state_bytes(m, blocks[block], b) for b in sizes) if batched.get("downstream") else 0.0
        jobs.append(edit_job("batched_edits", {**w, "method": block}, block, facts, n_batches, facts, n_batches, 0, states))
    sequential = experiments["sequential"]
    total, eval_at = sequential["total_edits"], sequential.get("eval_at")
    checkpoint_minutes = sequential.get("checkpoint_minutes", CHECKPOINT_MINUTES)
    for block, size, sample in sequential_runs(config):
        e = blocks[block]
        n_batches = math.ceil(total / size)
        reached = [min(k * size, total) for k in range(1, n_batches + 1)]
        whole = [n for n in reached if eval_at is None or n in set(eval_at) or n == total]
        scorings = total + sum(whole)  # every batch's own records, plus everything edited so far at eval points
        points = state_points(total, size, sequential.get("downstream_at", []))
        state = state_bytes(m, e, total)
        disk = 2 * len(points) * state + state  # staged and final states, the checkpoint
        # generation entropy: on the edited-so-far evaluations only, of at most generation_entropy_records facts each
        ge_cap = config["metrics"].get("generation_entropy_records") or total
        ge_records = sum(min(n, ge_cap) for n in whole)
        job = edit_job("sequential_edits", {**w, "method": block, "batch_size": size, "sample": sample}, block, total,
                       n_batches, scorings, n_batches + len(whole), ge_records, disk,
                       note=None if eval_at else "no eval_at: every batch scores all edits so far (quadratic)")
        job.host_gib += gib(2 * state)  # a checkpoint staged on the host
        if probe := sequential.get("probe"):  # one forward pass over the probe texts after every batch
            texts = probe.get("n_texts", 32)
            tokens = n_batches * texts * probe.get("max_length", 64)
            passes = n_batches * math.ceil(texts / PROBE_BATCH)
            job.hours += Cost().add(forward_flops(m, tokens), m.rate, passes * m.weight_bytes).seconds / 3600
            job.notes.append(f"probe: {tokens:,} tokens in {passes:,} passes")
        writes = max(1, job.hours * 60 / checkpoint_minutes) if checkpoint_minutes else n_batches
        job.hours += writes * state / 1e9 / 3600  # checkpoint writes at ~1 GB/s
        jobs.append(job)

    downstream = {k: v for k, v in config["downstream"].items()}
    if downstream.get("tasks"):
        def downstream_job(rule, wildcards, evaluations, block=None):
            cost, peak = downstream_cost(m, downstream, evaluations, Cost())
            extra = 0.0
            if block is not None:
                e = blocks[block]
                extra = (c_layer * e.n_layers if e.uses_statistics else 0) + 2 * state_bytes(m, e, total)
            return Job(rule, wildcards, gpu_gib=gib(base_gpu + peak + extra), host_gib=HOST_BASE_GIB + gib(extra),
                       hours=cost.seconds / 3600, notes=[f"{evaluations} evaluation(s)"],
                       resume_unit_min=cost.seconds / 60 / max(evaluations, 1))  # one state's evaluation

        jobs.append(downstream_job("downstream_base", dict(w), 1))
        for block, size, sample in sequential_runs(config):
            points = state_points(total, size, sequential.get("downstream_at", []))
            jobs.append(downstream_job("downstream_sequential", {**w, "method": block, "batch_size": size, "sample": sample},
                                       len(points), block))
        if batched.get("downstream"):
            for block in batched["methods"]:
                jobs.append(downstream_job("downstream_batched", {**w, "method": block}, len(batched["batch_sizes"]), block))
    return jobs


# ---------------------------------------------------------------------------- the SLURM profile


@dataclass(frozen=True)
class Resources:
    """A rule's request in the SLURM profile."""

    runtime_min: int
    mem_mb: int
    gpus: int
    partition: str


def profile_resources(profile_dir: str | Path) -> tuple[dict, int]:
    """rule -> Resources from the profile's config.yaml (default-resources overridden by
    set-resources), and its `retries`."""
    profile = yaml.safe_load((Path(profile_dir) / "config.yaml").read_text(encoding="utf-8"))
    default = profile.get("default-resources", {})

    def resources(rule: str) -> Resources:
        merged = {**default, **profile.get("set-resources", {}).get(rule, {})}
        gres = str(merged.get("gres", ""))
        gpus = int(gres.rsplit(":", 1)[1]) if gres.startswith("gpu:") else 0
        return Resources(int(merged["runtime"]), int(merged["mem_mb"]), gpus, str(merged.get("slurm_partition", "")))

    rules = {*MODEL_RULES, *CONDITIONAL_MODEL_RULES, "prepare_model", *RUN_RULES}
    return {rule: resources(rule) for rule in rules}, int(profile.get("retries", 0))


# Minutes an attempt of a resumable job spends before it edits again (loading the model, the
# checkpoint, C); the work since the last checkpoint (checkpoint_minutes) is lost too.
RESUME_OVERHEAD_MIN = 15


def fit(job: Job, resources: Resources, retries: int, gpu: Gpu = H100, checkpoint_minutes: float = CHECKPOINT_MINUTES) -> list[str]:
    """Why `job` does not fit its SLURM request (empty: it fits); sets job.attempts for a
    resumable job that needs several."""
    problems = []
    if job.gpu_gib and not resources.gpus:
        problems.append("loads the model but the profile gives it no GPU")
    if job.gpu_gib > gpu.memory_gib:
        problems.append(f"needs {job.gpu_gib:.1f} GiB of GPU memory, the {gpu.name} has {gpu.memory_gib}")
    if job.host_gib * GIB > resources.mem_mb * 2 ** 20:
        problems.append(f"needs {job.host_gib:.1f} GiB of host memory, the profile asks for {resources.mem_mb} MB")
    minutes = job.hours * 60
    if job.rule in RESUMABLE_RULES:
        lost = job.resume_unit_min if job.resume_unit_min is not None else checkpoint_minutes
        useful = resources.runtime_min - RESUME_OVERHEAD_MIN - lost
        job.attempts = max(1, math.ceil(minutes / useful)) if useful > 0 else 10 ** 6
        if job.attempts > retries + 1:
            problems.append(f"needs {job.attempts} attempts of {resources.runtime_min} min, the profile allows "
                            f"{retries + 1} (retries {retries})")
    elif minutes > resources.runtime_min:
        problems.append(f"needs {minutes:.0f} min, the profile gives {resources.runtime_min}")
    return problems


# ---------------------------------------------------------------------------- output


def format_plan(config: dict, jobs: list[Job], profile: tuple[dict, int] | None = None, gpu: Gpu = H100) -> str:
    lines = [f"Resource plan of run {config['run']!r} on {gpu.name} ({gpu.memory_gib} GiB; peak TFLOP/s "
             + ", ".join(f"{k} {v}" for k, v in gpu.tflops.items()) + f"; {gpu.bandwidth_tbs} TB/s, datasheet).",
             "ESTIMATES, NOT MEASUREMENTS: no GPU run of this project has been measured. Assumed utilisation "
             + ", ".join(f"{k} {v:.0%}" for k, v in ASSUMED_UTILISATION.items())
             + "; token counts per prompt and per lm-eval task assumed (editlib/study/plan.py).", ""]
    header = f"{'job':<48} {'GPU GiB':>8} {'host GiB':>9} {'disk GiB':>9} {'hours':>8} {'tries':>5}  notes"
    problems_total = []
    checkpoint_minutes = config["experiments"]["sequential"].get("checkpoint_minutes", CHECKPOINT_MINUTES)
    by_rule: dict[str, list[Job]] = {}
    for job in jobs:
        by_rule.setdefault(job.rule, []).append(job)
    for rule, rule_jobs in by_rule.items():
        lines.append(f"{rule} ({len(rule_jobs)} job{'s' if len(rule_jobs) > 1 else ''})")
        lines.append("  " + header)
        for job in rule_jobs:
            notes = list(job.notes)
            if profile is not None:
                resources, retries = profile
                for problem in fit(job, resources[rule], retries, gpu, checkpoint_minutes):
                    notes.append("DOES NOT FIT: " + problem)
                    problems_total.append(f"{rule} {job.name}: {problem}")
            gpu_text = f"{job.gpu_gib:8.1f}" if job.gpu_gib else f"{'-':>8}"
            lines.append(f"  {job.name:<48} {gpu_text} {job.host_gib:9.1f} {job.disk_gib:9.1f} {job.hours:8.2f} "
                         f"{job.attempts:5d}  {'; '.join(notes)}")
        lines.append("")
    gpu_jobs = [j for j in jobs if j.gpu_gib]
    largest_memory = max(gpu_jobs, key=lambda j: j.gpu_gib, default=None)
    longest = max(gpu_jobs, key=lambda j: j.hours, default=None)
    lines.append(f"total: {len(jobs)} jobs, {len(gpu_jobs)} on a GPU, {sum(j.hours for j in gpu_jobs):.1f} GPU-hours "
                 f"({gpu.name}), {sum(j.disk_gib for j in jobs):.0f} GiB written")
    if largest_memory:
        lines.append(f"largest GPU memory: {largest_memory.rule} {largest_memory.name}: {largest_memory.gpu_gib:.1f} GiB")
        lines.append(f"longest job: {longest.rule} {longest.name}: {longest.hours:.1f} h")
    if profile is not None:
        lines.append("every job fits the profile" if not problems_total else
                     f"{len(problems_total)} job(s) do not fit the profile:\n  " + "\n  ".join(problems_total))
    return "\n".join(lines)


def load_config(path: str | Path) -> dict:
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return validate_config(config, SCHEMA, source=str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editlib.study.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config.yaml", help="the workflow config (a --configfile)")
    parser.add_argument("--profile", help="a SLURM profile folder: check every job against its requests")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        jobs = plan_jobs(config)
    except ValueError as error:  # ConfigError included: the message names the file and field
        print(f"error: {error}", file=sys.stderr)
        return 2
    profile = profile_resources(args.profile) if args.profile else None
    print(format_plan(config, jobs, profile))
    if profile is not None:
        resources, retries = profile
        checkpoint_minutes = config["experiments"]["sequential"].get("checkpoint_minutes", CHECKPOINT_MINUTES)
        if any(fit(job, resources[job.rule], retries, H100, checkpoint_minutes) for job in jobs):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
