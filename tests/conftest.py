"""Shared fixtures: tiny models built from configs and tokenizers trained locally (no network)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from editlib.data.records import EditRequest
from editlib.toy.vocab import train_bpe_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

NAMES = ["Danielle Darrieux", "Edwin of Northumbria", "Toko Yasuda", "Autonomous University of Madrid",
         "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Apple A5", "Marcel Proust", "Lake Zurich", "Kotor"]
OBJECTS = ["French", "English", "Dutch", "Spanish", "Paris", "London", "Berlin", "guitar", "piano", "football"]
RELATIONS = ["The mother tongue of {} is", "{} is a citizen of", "{} plays the", "{} was born in",
             "The headquarters of {} is in", "{} works in the city of"]


def fact_object(relation: int, name: int) -> str:
    """The (fixed) true object of a relation for a subject, so the corpus states consistent facts."""
    return OBJECTS[(3 * relation + 7 * name) % len(OBJECTS)]


def corpus_sentences(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        r, s = rng.randrange(len(RELATIONS)), rng.randrange(len(NAMES))
        sentences.append(RELATIONS[r].format(NAMES[s]) + " " + fact_object(r, s) + ".")
    return sentences


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return corpus_sentences()


@pytest.fixture(scope="session")
def llama_tokenizer(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=600, add_bos=True)


@pytest.fixture(scope="session")
def gpt2_tokenizer(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=600, add_bos=False)


def make_llama(tokenizer, layers: int = 3, hidden: int = 64, seed: int = 0, frozen: bool = True, **overrides):
    """A seeded random LlamaForCausalLM sized for `tokenizer` (eval mode); `overrides` set LlamaConfig fields."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()
    for p in model.parameters():
        p.requires_grad_(not frozen)
    return model


def make_gpt2(tokenizer, layers: int = 3, hidden: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama(llama_tokenizer):
    return make_llama(llama_tokenizer)


@pytest.fixture
def tiny_gpt2(gpt2_tokenizer):
    return make_gpt2(gpt2_tokenizer)


class MinutePerReading:
    """A clock that advances 60 seconds each time it is read."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        self.seconds += 60.0
        return self.seconds


def make_requests(n: int = 4) -> list[EditRequest]:
    rows = [
        ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
        ("{} is a citizen of", "Toko Yasuda", "London", "Paris"),
        ("{} plays the", "Marcel Proust", "guitar", "piano"),
        ("{} was born in", "Lake Zurich", "Berlin", "Paris"),
        ("The headquarters of {} is in", "Apple A5", "Dutch", "Spanish"),
        ("{} works in the city of", "Kotor", "football", "London"),
    ]
    requests = []
    for i, (prompt, subject, new, true) in enumerate(rows[:n]):
        requests.append(EditRequest(
            case_id=i, prompt=prompt, subject=subject, target_new=new, target_true=true,
            paraphrase_prompts=(f"Some text. {prompt.format(subject)}",),
            neighborhood_prompts=(prompt.format(NAMES[(i + 5) % len(NAMES)]),),
        ))
    return requests


@pytest.fixture
def requests_():
    return make_requests()


def train_briefly(model, tokenizer, sentences: list[str], steps: int = 300, seed: int = 0):
    """A few AdamW steps of next-token training so hidden states have realistic structure."""
    from editlib.model.tokens import pad_right

    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(sentences)["input_ids"]
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        pick = torch.randint(len(ids), (32,), generator=generator).tolist()
        batch = pad_right([ids[i] for i in pick], tokenizer.pad_token_id)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def trained_llama_state(llama_tokenizer, corpus):
    model = train_briefly(make_llama(llama_tokenizer, layers=4), llama_tokenizer, corpus)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def trained_llama(llama_tokenizer, trained_llama_state):
    model = make_llama(llama_tokenizer, layers=4)
    model.load_state_dict(trained_llama_state)
    return model


@pytest.fixture(scope="session")
def trained_llama2_state(llama_tokenizer, corpus):
    """A 2-layer model that knows the corpus facts (recall 1.0 at 200 steps)."""
    model = train_briefly(make_llama(llama_tokenizer, layers=2), llama_tokenizer, corpus, steps=200)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def trained_llama2(llama_tokenizer, trained_llama2_state):
    model = make_llama(llama_tokenizer, layers=2)
    model.load_state_dict(trained_llama2_state)
    return model


@pytest.fixture(scope="session")
def moments2(trained_llama2_state, llama_tokenizer, corpus):
    """C = E[k k^T] of layers 0 and 1 of the trained 2-layer model, over the test corpus."""
    from editlib.editing.statistics import collect_second_moments
    from editlib.model.layout import model_layout

    model = make_llama(llama_tokenizer, layers=2)
    model.load_state_dict(trained_llama2_state)
    moments = collect_second_moments(model, llama_tokenizer, model_layout(model), [0, 1], corpus, progress=False)
    return {layer: m.mean for layer, m in moments.items()}
