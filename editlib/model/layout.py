"""Per-architecture module layout: where each layer's edited matrix, MLP and attention live, and the
edited weight exposed as (d_out, d_in) = (d, d_k) whatever the module stores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> (rewrite module, block, mlp, final norm, attention)
_LAYOUTS: dict[str, tuple[str, str, str, str, str]] = {
    "llama": ("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp", "model.norm", "model.layers.{}.self_attn"),
    "mistral": ("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp", "model.norm", "model.layers.{}.self_attn"),
    "qwen2": ("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp", "model.norm", "model.layers.{}.self_attn"),
    "qwen3": ("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp", "model.norm", "model.layers.{}.self_attn"),
    "gemma": ("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp", "model.norm", "model.layers.{}.self_attn"),
    "gemma2": ("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp", "model.norm", "model.layers.{}.self_attn"),
    "gemma3_text": ("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp", "model.norm", "model.layers.{}.self_attn"),
    "gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.h.{}", "transformer.h.{}.mlp", "transformer.ln_f", "transformer.h.{}.attn"),
    "gptj": ("transformer.h.{}.mlp.fc_out", "transformer.h.{}", "transformer.h.{}.mlp", "transformer.ln_f", "transformer.h.{}.attn"),
    "gpt_neox": (
        "gpt_neox.layers.{}.mlp.dense_4h_to_h",
        "gpt_neox.layers.{}",
        "gpt_neox.layers.{}.mlp",
        "gpt_neox.final_layer_norm",
        "gpt_neox.layers.{}.attention",
    ),
}


@dataclass(frozen=True)
class ModelLayout:
    """Where the editable parts of a causal LM live (module-name templates take a layer index)."""

    model_type: str
    rewrite_module: str
    block_module: str
    mlp_module: str
    final_norm: str
    attn_module: str
    n_layers: int

    def rewrite(self, layer: int) -> str:
        return self.rewrite_module.format(self.check_layer(layer))

    def block(self, layer: int) -> str:
        return self.block_module.format(self.check_layer(layer))

    def mlp(self, layer: int) -> str:
        return self.mlp_module.format(self.check_layer(layer))

    def attn(self, layer: int) -> str:
        return self.attn_module.format(self.check_layer(layer))

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: this {self.model_type} model has layers 0..{self.n_layers - 1}")
        return layer


def model_layout(model: nn.Module) -> ModelLayout:
    """Resolve the module layout of a HF causal LM from its config's model_type."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in _LAYOUTS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(_LAYOUTS)}")
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    return ModelLayout(model_type, *_LAYOUTS[model_type], n_layers=n_layers)


def weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Convert between (out, in) and the layout of `module.weight` (either way: a transpose is its
    own inverse). GPT-2's Conv1D stores (in, out), Linear (out, in); the one place that knows."""
    return matrix.T if type(module).__name__ == "Conv1D" else matrix


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight` as an (out, in) view; in-place changes modify the module."""
    return weight_layout(module, module.weight)


def module_dims(module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or GPT-2 Conv1D."""
    d_out, d_in = out_in_weight(module).shape
    return d_in, d_out


def edited_weight(model: nn.Module, layout: ModelLayout, layer: int) -> torch.Tensor:
    """The edited matrix of `layer` as a (d, d_k) view; in-place changes modify the model."""
    return out_in_weight(model.get_submodule(layout.rewrite(layer)))


def edited_bias(model: nn.Module, layout: ModelLayout, layer: int) -> torch.Tensor | None:
    """The bias of the edited module, or None."""
    return getattr(model.get_submodule(layout.rewrite(layer)), "bias", None)


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection (tied or not)."""
    return model.get_output_embeddings()


def block_index(model: nn.Module, module_name: str) -> int:
    """Index of the transformer block that is or contains module `module_name`."""
    layout = model_layout(model)
    for layer in range(layout.n_layers):
        block = layout.block(layer)
        if module_name == block or module_name.startswith(block + "."):
            return layer
    raise ValueError(f"{module_name!r} is not inside a transformer block of this {layout.model_type} model")
