"""The rehearsal's stand-ins for what only the network provides, written as the files a host serves.

Everything is built from a small toy world (`editlib.toy.world`), deterministically:

- `write_model_repo`: a hub model repository (config.json, generation_config.json, sharded
  safetensors with their index, tokenizer.json, tokenizer_config.json, special_tokens_map.json)
  holding a random model (its output head scoring whole words only) of the hub model's architecture (`editlib.model.architectures.HUB_ARCHITECTURES`:
  model type, depth, grouped-query attention ratio, rope theta, norm eps, tie flag, stored dtype)
  at a tiny width, with a tokenizer that keeps the model family's special-token conventions
  (`llama3_tokenizer`, `llama2_tokenizer`);
- `counterfact_json` / `zsre_json`: records in the public files' exact formats;
- `write_wikipedia_repo`: the ``wikimedia/wikipedia`` dataset repository, config ``20231101.en``,
  split ``train``, parquet shards with the real columns (id, url, title, text);
- `editlib.study.rehearsal.tasks`: the lm-eval tasks and their dataset repositories.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from editlib.io import write_json, write_text
from editlib.model.architectures import HUB_ARCHITECTURES
from editlib.toy.world import (
    World,
    WorldConfig,
    counterfact_records,
    make_world,
    training_corpus,
    wiki_documents,
    zsre_records,
)

WIDTH = 64  # the stand-in models' hidden size
HEADS = 4  # their attention heads (key/value heads keep the hub model's ratio)
VOCAB = 768  # BPE vocabulary trained on the toy world (special and byte tokens on top)

LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Meta-Llama-3's other named special tokens (its 250 reserved ones left out)
LLAMA3_SPECIALS = (LLAMA3_BOS, LLAMA3_EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Meta-Llama-3's pre-tokenizer split pattern (its tokenizer.json)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA2_UNK, LLAMA2_BOS, LLAMA2_EOS = "<unk>", "<s>", "</s>"
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
_BIG = 1000000000000000019884624838656  # model_max_length of both families' tokenizer_config.json


def toy_world(seed: int = 0, n_subjects: int = 200) -> World:
    return make_world(WorldConfig(seed=seed, n_subjects=n_subjects))


def tokenizer_texts(world: World) -> list[str]:
    """What the stand-in tokenizers are trained on: the toy world's sentences and documents, and
    a little code and arithmetic (the local tasks' material)."""
    extra = ["def add(a, b):\n    return a + b", "assert add(2, 3) == 5", "not ( True and False ) is True",
             "Q: A: Let's think step by step. So the answer is False.", "[BEGIN] [DONE] 0123456789"]
    return training_corpus(world) + [doc["text"] for doc in wiki_documents(world)] + extra * 20


# ---------------------------------------------------------------------------- tokenizers


def llama3_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB):
    """Byte-level BPE as Meta-Llama-3's: its split pattern, BOS `<|begin_of_text|>` prepended by the
    post-processor, EOS `<|end_of_text|>` never appended, no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id(LLAMA3_BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{LLAMA3_BOS}:0 $A:0", pair=f"{LLAMA3_BOS}:0 $A:0 {LLAMA3_BOS}:1 $B:1",
                                      special_tokens=[(LLAMA3_BOS, bos)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOS,
                                   clean_up_tokenization_spaces=True, model_max_length=_BIG)


def llama2_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB):
    """SentencePiece-style BPE as Llama-2's (transformers' LlamaTokenizer): `▁` Metaspace, byte
    fallback (<0x00>..<0xFF> at ids 3-258), `<unk>` 0, `<s>` 1 prepended, `</s>` 2 never appended,
    no pad token. Merges are learned within words, as SentencePiece's are."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    learner = Tokenizer(models.BPE(unk_token=LLAMA2_UNK))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learner.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[LLAMA2_UNK, LLAMA2_BOS, LLAMA2_EOS], show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {LLAMA2_UNK: 0, LLAMA2_BOS: 1, LLAMA2_EOS: 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in learned["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False,
                          model_max_length=_BIG, padding_side="right")


def family(hub_id: str) -> str:
    """"llama3" or "llama2": whose tokenizer conventions a hub model's stand-in keeps."""
    if hub_id not in HUB_ARCHITECTURES:
        raise ValueError(f"no stand-in for {hub_id!r}: editlib.model.architectures.HUB_ARCHITECTURES has "
                         f"{sorted(HUB_ARCHITECTURES)}")
    return "llama3" if "Llama-3" in hub_id else "llama2"


def tokenizer_config(hub_id: str) -> dict:
    """The fields of the hub model's tokenizer_config.json that loading and scoring read."""
    if family(hub_id) == "llama3":
        return {"bos_token": LLAMA3_BOS, "eos_token": LLAMA3_EOS, "clean_up_tokenization_spaces": True,
                "model_input_names": ["input_ids", "attention_mask"], "model_max_length": _BIG,
                "tokenizer_class": "PreTrainedTokenizerFast"}
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": LLAMA2_BOS, "eos_token": LLAMA2_EOS,
              "unk_token": LLAMA2_UNK, "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False,
              "model_max_length": _BIG, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False}
    if hub_id.endswith("-chat-hf"):
        config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    return config


def write_tokenizer(hub_id: str, texts: Sequence[str], out_dir: str | Path) -> None:
    """The stand-in tokenizer's files in `out_dir`, tokenizer_config.json with the hub model's fields."""
    out_dir = Path(out_dir)
    tokenizer = llama3_tokenizer(texts) if family(hub_id) == "llama3" else llama2_tokenizer(texts)
    tokenizer.save_pretrained(out_dir)
    saved = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    fields = tokenizer_config(hub_id)
    config = {"added_tokens_decoder": saved.get("added_tokens_decoder", {}), **fields}
    write_json(out_dir / "tokenizer_config.json", config)
    special = {key: fields[key] for key in ("bos_token", "eos_token", "unk_token") if fields.get(key)}
    write_json(out_dir / "special_tokens_map.json", special)


# ---------------------------------------------------------------------------- models


def standin_config(hub_id: str, vocab_size: int, bos_token_id: int, eos_token_id: int, width: int = WIDTH) -> dict:
    """config.json fields of the stand-in: the hub model's, at `width` (heads of width / HEADS,
    key/value heads in the hub model's ratio, MLP in its ratio), with the stand-in's vocabulary."""
    arch = HUB_ARCHITECTURES[hub_id]
    ratio = arch["num_attention_heads"] // arch["num_key_value_heads"]
    if HEADS % ratio:
        raise ValueError(f"{hub_id}: {HEADS} heads cannot keep the grouped-query ratio {ratio}")
    intermediate = 8 * round(width * arch["intermediate_size"] / arch["hidden_size"] / 8)
    return {
        **{key: arch[key] for key in ("architectures", "model_type", "hidden_act", "num_hidden_layers",
                                      "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")},
        "hidden_size": width, "intermediate_size": intermediate, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS // ratio, "head_dim": width // HEADS, "vocab_size": vocab_size,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
    }


def word_tokens(tokenizer):
    """A boolean tensor over the vocabulary: tokens that are a whole alphabetic word of two or more
    letters with its leading space (byte-level "Ġ" or SentencePiece "▁")."""
    import torch

    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([p[:1] in ("Ġ", "▁") and p[1:].isalpha() and len(p) > 2 for p in pieces])


def write_model_repo(hub_id: str, out_dir: str | Path, texts: Sequence[str], seed: int = 0, shards: int = 2) -> dict:
    """A hub model repository at `out_dir` (written in place; the caller stages it): the stand-in
    model, stored in the hub model's dtype in `shards` safetensors shards with their index, and
    its tokenizer. Returns the config.json written."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    write_tokenizer(hub_id, texts, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    fields = standin_config(hub_id, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    config = LlamaConfig(**fields)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # the head scores whole words only: the greedy next token is a word (`known_to`)
        model.lm_head.weight[~word_tokens(tokenizer)] = 0.0
    model = model.to(getattr(torch, HUB_ARCHITECTURES[hub_id]["dtype"]))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, max_shard_size=max(size // shards + 1, 1 << 16))
    written = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    write_text(out_dir / "README.md", f"---\nlibrary_name: transformers\n---\n# Stand-in for {hub_id}\n\n"
               "A random model of the same architecture at a tiny width (editlib rehearsal).\n")
    return written


# ---------------------------------------------------------------------------- records


def _qid(text: str) -> str:
    """A Wikidata-like item id for an object string (stable across runs)."""
    return f"Q{int.from_bytes(text.encode()[:6].ljust(6, b'_'), 'big') % 10_000_000}"


def counterfact_json(world: World) -> list[dict]:
    """CounterFact records in counterfact.json's format and key order (case_id, pararel_idx,
    requested_rewrite {prompt, relation_id, target_new {str, id}, target_true {str, id}, subject},
    paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts)."""
    records = []
    for index, record in enumerate(counterfact_records(world)):
        rewrite = record["requested_rewrite"]
        records.append({
            "case_id": record["case_id"],
            "pararel_idx": 2000 + index,
            "requested_rewrite": {
                "prompt": rewrite["prompt"],
                "relation_id": rewrite["relation_id"],
                "target_new": {"str": rewrite["target_new"]["str"], "id": _qid(rewrite["target_new"]["str"])},
                "target_true": {"str": rewrite["target_true"]["str"], "id": _qid(rewrite["target_true"]["str"])},
                "subject": rewrite["subject"],
            },
            **{key: record[key] for key in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts",
                                            "generation_prompts")},
        })
    return records


def zsre_json(world: World) -> list[dict]:
    """ZsRE records in zsre_mem.json's format (subject, src, pred, rephrase, alt, answers, loc,
    loc_ans, cond)."""
    return zsre_records(world, counterfact_records(world))


def _record_text(record: dict, kind: str) -> str:
    if kind == "zsre":
        return record["src"]
    rewrite = record["requested_rewrite"]
    return rewrite["prompt"].format(rewrite["subject"])


def known_to(model_dir: str | Path, records: Sequence[dict], kind: str) -> list[dict]:
    """`records` whose true object is rewritten to the stand-in model's greedy next word where that
    word is one token the model predicts (`known_facts(..., criterion="first_token")` then finds them), so that
    causal tracing has facts the random model "knows". Other records are returned unchanged;
    a record whose new target would equal its true object keeps its own."""
    import torch

    from editlib.eval.metrics import prompt_ids, target_ids
    from editlib.model.loading import load_model

    model, tokenizer = load_model(str(model_dir))
    texts = [_record_text(record, kind) for record in records]
    out = []
    with torch.no_grad():
        for record, ids in zip(records, prompt_ids(tokenizer, texts)):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            word = tokenizer.decode([token]).strip()
            record = json.loads(json.dumps(record))
            if word and word.isprintable() and target_ids(tokenizer, [word])[0][:1] == [token]:
                if kind == "zsre" and word != record["alt"]:
                    old = record["answers"][0]
                    record.update(pred=word, answers=[word], cond=record["cond"].replace(old, word, 1))
                elif kind == "counterfact" and word != record["requested_rewrite"]["target_new"]["str"]:
                    record["requested_rewrite"]["target_true"] = {"str": word, "id": _qid(word)}
            out.append(record)
    return out


# ---------------------------------------------------------------------------- Wikipedia


WIKIPEDIA_REPO = "wikimedia/wikipedia"
WIKIPEDIA_CONFIG = "20231101.en"
WIKIPEDIA_COLUMNS = ("id", "url", "title", "text")


def wikipedia_rows(world: World) -> list[dict]:
    """Articles with the dump's columns (id, url, title, text), the toy world's documents as text."""
    rows = []
    for index, doc in enumerate(wiki_documents(world)):
        article_id = str(12 + 7 * index)
        title = doc["text"].split(" ")[0].strip(".,") + f" ({index})"
        rows.append({"id": article_id, "url": f"https://en.wikipedia.org/wiki?curid={article_id}",
                     "title": title, "text": doc["text"]})
    return rows


def dataset_card(configs: dict[str, dict[str, tuple[str, int, int]]], features: Sequence[dict]) -> str:
    """A dataset card (README.md) as the Hub's parquet datasets have: `configs` (config name ->
    split -> (data_files pattern, rows, bytes)) and their `dataset_info` (`features` as the card
    lists them, e.g. {"name": "text", "dtype": "string"})."""
    import yaml

    card = {
        "configs": [{"config_name": name, "data_files": [{"split": split, "path": pattern}
                                                          for split, (pattern, _, _) in splits.items()]}
                    for name, splits in configs.items()],
        "dataset_info": [{"config_name": name,
                          "features": list(features),
                          "splits": [{"name": split, "num_bytes": size, "num_examples": rows}
                                     for split, (_, rows, size) in splits.items()]}
                         for name, splits in configs.items()],
    }
    return "---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n"


def write_parquet(rows: Sequence[dict], path: Path, columns: Sequence[str], shards: int = 1) -> list[Path]:
    """`rows` as `shards` parquet files named like the Hub's (<stem>-0000i-of-0000n.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    size = -(-len(rows) // shards)
    for shard in range(shards):
        part = rows[shard * size:(shard + 1) * size]
        table = pa.table({column: [row[column] for row in part] for column in columns})
        target = path.with_name(f"{path.name}-{shard:05d}-of-{shards:05d}.parquet")
        pq.write_table(table, target)
        written.append(target)
    return written


def write_dataset_repo(out_dir: Path, splits_by_config: dict[str, dict[str, list[dict]]],
                       features: Sequence[dict], shards: int = 1) -> None:
    """A parquet dataset repository: <config>/<split>-*.parquet and its card."""
    configs = {}
    for name, splits in splits_by_config.items():
        configs[name] = {}
        for split, rows in splits.items():
            files = write_parquet(rows, out_dir / name / split, [f["name"] for f in features], shards)
            configs[name][split] = (f"{name}/{split}-*", len(rows), sum(f.stat().st_size for f in files))
    write_text(out_dir / "README.md", dataset_card(configs, features))


def write_wikipedia_repo(out_dir: str | Path, world: World, shards: int = 2) -> list[dict]:
    """The wikimedia/wikipedia stand-in (config 20231101.en, split train) at `out_dir`."""
    rows = wikipedia_rows(world)
    write_dataset_repo(Path(out_dir), {WIKIPEDIA_CONFIG: {"train": rows}},
                       [{"name": column, "dtype": "string"} for column in WIKIPEDIA_COLUMNS], shards)
    return rows
