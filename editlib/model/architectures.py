"""The published architectures of the paper configs' hub models, from their config.json.

Torch-free. Used where a model's dimensions are needed before (or without) downloading it: the
resource plan (`editlib.study.plan`), checking layers against a model's depth when the hub cannot be
reached, and the rehearsal's stand-ins, which keep each model's architecture fields (model type,
grouped-query attention ratio, rope, norms, special tokens) at a tiny width.

Each entry holds the fields of the model's config.json on the hub (revision `main`) that these
uses read; `dtype` is the dtype its weights are stored in.
"""

from __future__ import annotations

_LLAMA2_BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "dtype": "float16",
}

HUB_ARCHITECTURES: dict[str, dict] = {
    "meta-llama/Meta-Llama-3-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "dtype": "bfloat16",
    },
    "meta-llama/Llama-2-7b-hf": {**_LLAMA2_BASE, "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "meta-llama/Llama-2-7b-chat-hf": {**_LLAMA2_BASE, "hidden_size": 4096, "intermediate_size": 11008,
                                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "meta-llama/Llama-2-13b-hf": {**_LLAMA2_BASE, "hidden_size": 5120, "intermediate_size": 13824,
                                  "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
}


def parameter_count(arch: dict) -> int:
    """Parameters of a Llama-family model with these fields (embeddings and head counted apart
    when untied)."""
    d, f, n, vocab = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    d_kv = d * arch["num_key_value_heads"] // arch["num_attention_heads"]
    attention = 2 * d * d + 2 * d * d_kv
    mlp = 3 * d * f
    norms = 2 * d
    embeddings = vocab * d * (1 if arch.get("tie_word_embeddings") else 2)
    return n * (attention + mlp + norms) + embeddings + d
