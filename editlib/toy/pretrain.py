"""Pretrain the tiny Llama that knows the toy world (CPU, deterministic, a few minutes).

A byte-level BPE tokenizer with a Llama-3-style BOS is trained on the world's training corpus;
a LlamaForCausalLM built from a small LlamaConfig is trained on whole sentences (one sentence
per row: BOS + sentence + EOS, right padded) with AdamW, linear warmup and cosine decay, in a
fixed, seeded data order. Afterwards we measure top-1 recall: the fraction of prompts whose
greedy continuation starts with all tokens of the true object. Greedy decoding continues with the
target as long as every argmax matches it, so one teacher-forced pass decides it exactly.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editlib.eval.metrics import score_continuations
from editlib.io import atomic_dir, content_key, write_json
from editlib.model.tokens import pad_right, prompt_ids, target_ids
from editlib.toy.recipe import TrainConfig, world_hashes  # noqa: F401  (TrainConfig re-exported: defined there)
from editlib.toy.vocab import train_bpe_tokenizer


class RecallError(RuntimeError):
    """The trained model does not know the world well enough for editing experiments."""


def read_corpus(world_dir: str | Path) -> list[str]:
    """The training sentences of a toy world (one per line)."""
    text = (Path(world_dir) / "train_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_model(config: TrainConfig, tokenizer):
    """A freshly initialised LlamaForCausalLM (seeded) sized for `tokenizer`; with `local_layers`,
    a Qwen2ForCausalLM (the Llama block with q/k/v biases) whose first `local_layers` layers attend
    only to the last `local_window` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(config.seed)
    if config.local_layers:
        qwen = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=config.intermediate,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
            max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
            use_sliding_window=True, sliding_window=config.local_window, max_window_layers=config.layers,
            layer_types=["sliding_attention"] * config.local_layers + ["full_attention"] * (config.layers - config.local_layers),
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return _without_late_mlps(Qwen2ForCausalLM(qwen), config)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _without_late_mlps(LlamaForCausalLM(llama), config)


def _without_late_mlps(model, config: TrainConfig):
    """Zero (and freeze) the MLP down-projections of layers >= `mlp_layers`: those layers are
    attention-only, so facts can be recalled only from what earlier MLPs wrote."""
    if config.mlp_layers is None:
        return model
    for layer in model.model.layers[config.mlp_layers :]:
        with torch.no_grad():
            layer.mlp.down_proj.weight.zero_()
        layer.mlp.down_proj.weight.requires_grad_(False)
    return model


def _skip_zero_mlps(model, config: TrainConfig):
    """While training, let the attention-only layers skip their MLP (its output is exactly zero)."""
    skipped = [] if config.mlp_layers is None else list(model.model.layers[config.mlp_layers :])
    for layer in skipped:
        layer.mlp.forward = torch.zeros_like
    return skipped


def _restore_mlps(skipped) -> None:
    for layer in skipped:
        del layer.mlp.forward


def encode_sentences(tokenizer, sentences: Sequence[str], seq_len: int) -> list[list[int]]:
    """BOS + sentence + EOS ids per sentence; a sentence longer than seq_len is an error
    (truncation would cut off the object that has to be learnt)."""
    encoded = [ids + [tokenizer.eos_token_id] for ids in prompt_ids(tokenizer, list(sentences))]
    for sentence, ids in zip(sentences, encoded):
        if len(ids) > seq_len:
            raise ValueError(f"sentence has {len(ids)} tokens > seq_len {seq_len}; raise TrainConfig.seq_len: {sentence!r}")
    return encoded


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def batch_order(lengths: Sequence[int], config: TrainConfig) -> list[list[int]]:
    """Row indices of every step's batch, fixed by the seed.

    Consecutive seeded permutations (epochs) are cut into windows of `bucket_batches` batches;
    inside a window rows are sorted by length, split into batches and the batches shuffled,
    so padding is small while the order stays random at the scale of a window.
    """
    generator = torch.Generator().manual_seed(config.seed)
    needed = config.steps * config.batch_size
    epochs = [torch.randperm(len(lengths), generator=generator) for _ in range(math.ceil(needed / len(lengths)))]
    rows = torch.cat(epochs)[:needed].tolist()
    window = config.bucket_batches * config.batch_size
    batches: list[list[int]] = []
    for start in range(0, needed, window):
        chunk = sorted(rows[start : start + window], key=lambda row: lengths[row])
        chunk_batches = [chunk[i : i + config.batch_size] for i in range(0, len(chunk), config.batch_size)]
        shuffled = torch.randperm(len(chunk_batches), generator=generator).tolist()
        batches += [chunk_batches[i] for i in shuffled]
    return batches


def train_steps(model, sequences: list[list[int]], pad: int, config: TrainConfig) -> list[float]:
    """Run the optimisation; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    order = batch_order([len(sequence) for sequence in sequences], config)
    losses = []
    model.train()
    progress = tqdm(range(config.steps), desc="pretrain", mininterval=2.0)
    for step in progress:
        batch = pad_right([sequences[i] for i in order[step]], pad)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def greedy_hits(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 256) -> list[bool]:
    """Per prompt: does greedy decoding start with every token of " " + answer?

    Teacher forcing on the answer is exact here: greedy decoding follows the answer for as long
    as each argmax equals the next answer token (`editlib.eval.metrics.score_continuations`).
    """
    return score_continuations(model, tokenizer, prompts, answers, max_rows=batch_size)[1].tolist()


def _fraction(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def recall_report(model, tokenizer, world_dir: str | Path, batch_size: int = 256) -> dict:
    """Top-1 recall on the CounterFact records' prompts (edit, paraphrase, neighbourhood) and
    greedy accuracy on the downstream tasks' questions."""
    world_dir = Path(world_dir)
    records = json.loads((world_dir / "counterfact.json").read_text(encoding="utf-8"))
    groups: dict[str, tuple[list[str], list[str]]] = {"edit": ([], []), "paraphrase": ([], []), "neighborhood": ([], [])}
    for record in records:
        rewrite = record["requested_rewrite"]
        true = rewrite["target_true"]["str"]
        prompts = {
            "edit": [rewrite["prompt"].format(rewrite["subject"])],
            "paraphrase": record["paraphrase_prompts"],
            "neighborhood": record["neighborhood_prompts"],
        }
        for group, texts in prompts.items():
            groups[group][0].extend(texts)
            groups[group][1].extend([true] * len(texts))
    for task in ("toy_facts", "toy_compose"):
        rows = [json.loads(line) for line in (world_dir / "tasks" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]
        groups[task] = ([row["question"] for row in rows], [row["choices"][row["answer"]] for row in rows])
    report = {}
    for group, (prompts, answers) in groups.items():
        report[f"recall_{group}"] = _fraction(greedy_hits(model, tokenizer, prompts, answers, batch_size))
        report[f"n_{group}"] = len(prompts)
    return report


@torch.no_grad()
def mlp_activation_stats(model, sequences: list[list[int]], pad: int, n_rows: int = 256) -> list[dict]:
    """Per layer: the fraction of dead MLP units (|act(gate) * up| < 1e-3 on every real token of
    `n_rows` sentences) and the median unit RMS, measured at the input of mlp.down_proj."""
    batch = pad_right(sequences[:n_rows], pad)
    mask = batch.attention_mask.bool()
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        def hook(module, args, index=index):
            captured[index] = args[0][mask]  # (tokens, d_k)

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    stats = []
    for index in sorted(captured):
        keys = captured[index]
        rms = keys.pow(2).mean(0).sqrt()  # (d_k,)
        dead = (keys.abs().amax(0) < 1e-3).float().mean().item()
        stats.append({"layer": index, "dead_fraction": dead, "median_unit_rms": rms.median().item()})
    return stats


def single_token_objects(tokenizer, world_dir: str | Path) -> float:
    """Fraction of relation objects that are one token (as " " + object)."""
    world = json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))
    objects = sorted({obj for relation in world["relations"] for obj in relation["objects"]})
    return sum(len(ids) == 1 for ids in target_ids(tokenizer, objects)) / len(objects)


def save_model_dir(model, tokenizer, report: dict, out_dir: Path, check_texts: Sequence[str] = ()) -> None:
    """Write model (safetensors), tokenizer and recall.json into a temporary sibling folder,
    then move it onto out_dir, so a crash never leaves a half-written model folder.

    The tokenizer is read back before the folder is published and must encode `check_texts`
    exactly as the tokenizer the model was trained with."""
    from editlib.model.loading import load_tokenizer

    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        reloaded = load_tokenizer(str(staging))
        for text in check_texts:
            if reloaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
                raise RuntimeError(f"the saved tokenizer encodes {text!r} differently from the trained one")
        write_json(staging / "recall.json", report)


def train_model(world_dir: str | Path, out_dir: str | Path, config: TrainConfig | None = None) -> dict:
    """Train the toy-world model, save it to out_dir and return the recall report.

    out_dir holds config.json, model.safetensors, generation_config.json, the tokenizer files
    and recall.json. Raises RecallError (after saving, for inspection) if edit-prompt recall is
    below `config.recall_threshold`.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_and_save(world_dir, out_dir, config)
    finally:
        torch.set_num_threads(previous_threads)


def model_cache_key(world_dir: str | Path, config: TrainConfig) -> str:
    """Content key of a trained toy model: its TrainConfig, the bytes of the world files it reads,
    and the torch / transformers versions (training numerics may change with them)."""
    import transformers

    return content_key({"config": asdict(config), "files": world_hashes(world_dir), "torch": torch.__version__,
                        "transformers": transformers.__version__})


def cached_train_model(world_dir: str | Path, out_dir: str | Path, config: TrainConfig, cache_dir: str | Path) -> dict:
    """`train_model` through a content-keyed cache: the same world and config give back the model
    trained before (copied from `cache_dir`) instead of training it again."""
    cached = Path(cache_dir) / f"toy-{model_cache_key(world_dir, config)}"
    if (cached / "recall.json").exists():
        with atomic_dir(out_dir) as staging:
            shutil.copytree(cached, staging, dirs_exist_ok=True)
        return json.loads((Path(out_dir) / "recall.json").read_text(encoding="utf-8"))
    report = train_model(world_dir, out_dir, config)  # a RecallError leaves it out of the cache
    with atomic_dir(cached) as staging:
        shutil.copytree(out_dir, staging, dirs_exist_ok=True)
    return report


def dialogue_phase(config: TrainConfig) -> TrainConfig:
    """The optimisation settings of the dialogue phase (its own warm-up and decay)."""
    return replace(config, steps=config.dialogue_steps, lr=config.dialogue_lr,
                   warmup_steps=min(config.warmup_steps, max(1, config.dialogue_steps // 10)))


def dialogue_sequences(world_dir: str | Path, sentences: list[str], tokenizer, config: TrainConfig) -> list[list[int]]:
    """The dialogue phase's data: every dialogue of the world plus as many corpus sentences
    (seeded choice), so that the statements the experiments edit stay known."""
    from editlib.toy.world import dialogue_corpus, load_world

    dialogues = dialogue_corpus(load_world(world_dir))
    rng = random.Random(config.seed)
    mixed = dialogues + rng.sample(sentences, min(len(sentences), len(dialogues)))
    rng.shuffle(mixed)
    return encode_sentences(tokenizer, mixed, config.seq_len)


def _train_and_save(world_dir: str | Path, out_dir: Path, config: TrainConfig) -> dict:
    started = time.perf_counter()
    sentences = read_corpus(world_dir)
    tokenizer = train_bpe_tokenizer(sentences, vocab_size=config.vocab_size, add_bos=True,
                                    add_prefix_space=config.prefix_space)
    sequences = encode_sentences(tokenizer, sentences, config.seq_len)
    model = build_model(config, tokenizer)
    skipped = _skip_zero_mlps(model, config)
    try:
        losses = train_steps(model, sequences, tokenizer.pad_token_id, config)
        if config.dialogue_steps:
            losses += train_steps(model, dialogue_sequences(world_dir, sentences, tokenizer, config),
                                  tokenizer.pad_token_id, dialogue_phase(config))
    finally:
        _restore_mlps(skipped)
    train_seconds = time.perf_counter() - started
    report = {
        "train_config": asdict(config),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "n_sentences": len(sentences),
        "train_seconds": round(train_seconds, 1),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "single_token_objects": single_token_objects(tokenizer, world_dir),
        **recall_report(model, tokenizer, world_dir, config.eval_batch_size),
        "mlp": mlp_activation_stats(model, sequences, tokenizer.pad_token_id),
    }
    report["passed"] = report["recall_edit"] >= config.recall_threshold
    save_model_dir(model, tokenizer, report, out_dir, check_texts=sentences[:200])
    if not report["passed"]:
        raise RecallError(
            f"toy-world model recall on edit prompts is {report['recall_edit']:.3f} < threshold "
            f"{config.recall_threshold} (paraphrases {report['recall_paraphrase']:.3f}, final loss "
            f"{report['final_loss']:.3f}); train longer (TrainConfig.steps) or larger. Saved to {out_dir} for inspection."
        )
    return report
