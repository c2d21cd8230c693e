"""The toy model's training recipe (torch-free, so config validation can check it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from editlib.editing.hparams import check_ranges
from editlib.io import sha256_file

# The world files that training and the recall check read: a trained model depends on these only
# (editlib.toy.pretrain.model_cache_key and the pinned model's manifest, editlib.toy.pinned, hash them).
MODEL_INPUTS = ("train_corpus.txt", "counterfact.json", "world.json", "tasks/toy_facts.jsonl", "tasks/toy_compose.jsonl")


def world_hashes(world_dir: str | Path) -> dict[str, str]:
    """SHA-256 of each world file the model is trained on (MODEL_INPUTS) that `world_dir` holds: the
    world part of the model cache's key and of a pinned model's manifest."""
    world_dir = Path(world_dir)
    return {name: sha256_file(world_dir / name) for name in MODEL_INPUTS if (world_dir / name).exists()}


# ---------------------------------------------------------------------------- the toy model's training


@dataclass(frozen=True)
class TrainConfig:
    """Model size, optimisation and acceptance threshold of the toy-world model.

    `threads` fixes torch's intra-op threads (results depend on it). Give training the cores
    when it runs alone (500 steps of the tests' model on a 2-core machine: 48 s with 2 threads,
    71-77 s with 1), and 1 when other jobs share them (spinning OpenMP threads of jobs side by
    side slow each other down).
    """

    layers: int = 4
    hidden: int = 128
    intermediate: int = 512
    heads: int = 4
    vocab_size: int = 2048
    steps: int = 1600
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    batch_size: int = 64
    seq_len: int = 48
    bucket_batches: int = 32
    max_position_embeddings: int = 512
    seed: int = 0
    threads: int = 1
    recall_threshold: float = 0.9
    eval_batch_size: int = 256
    local_layers: int = 0
    local_window: int = 4
    mlp_layers: int | None = None
    prefix_space: bool = True
    # the toy "chat" variant: after pretraining, `dialogue_steps` more steps at `dialogue_lr` on the
    # world's question-answer dialogues (toyworld.dialogue_corpus) mixed 1:1 with corpus sentences
    dialogue_steps: int = 0
    dialogue_lr: float = 5e-4

    def __post_init__(self):
        check_ranges("train", self, counts=("layers", "hidden", "intermediate", "heads", "vocab_size", "steps",
                                            "batch_size", "seq_len", "bucket_batches", "max_position_embeddings",
                                            "threads", "eval_batch_size"),
                     positive=("lr", "dialogue_lr"), non_negative=("warmup_steps", "weight_decay", "seed", "dialogue_steps"),
                     fractions=("min_lr_ratio", "recall_threshold"))
        if self.hidden % self.heads:
            raise ValueError(f"train: hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not 0 <= self.local_layers <= self.layers:
            raise ValueError(f"local_layers must be in [0, layers={self.layers}], got {self.local_layers}")
        if self.mlp_layers is not None and not 1 <= self.mlp_layers <= self.layers:
            raise ValueError(f"mlp_layers must be in [1, layers={self.layers}], got {self.mlp_layers}")
        if self.local_window < 1:
            raise ValueError(f"local_window must be >= 1, got {self.local_window}")
