"""Model access: loading, per-architecture module layout, edited weights, and hooks.

The edited matrix W is always exposed as (d_out, d_in) = (d, d_k), whatever the storage
(GPT-2's Conv1D stores (in, out); we return a transposed view, so in-place updates land).
Hooks accept blocks that return a tensor (transformers >= 4.56) or a tuple (older ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

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


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


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


# The files of a hub model that loading reads (safetensors weights, configs, tokenizer); not the
# original/ checkpoints (e.g. Meta-Llama-3-8B's 16 GB consolidated.00.pth) nor .bin duplicates.
HUB_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
HUB_POINTER = "hub.json"


def download_hub_model(repo_id: str, out_dir: str | Path, revision: str = "main",
                       cache_dir: str | Path | None = None) -> dict:
    """Fetch hub model `repo_id` at `revision` (branch, tag or commit) into the Hugging Face cache
    (`cache_dir`, default HF_HUB_CACHE) and write `out_dir`/hub.json: the repo id, the requested
    revision and the commit it resolved to. Nothing else is written to `out_dir`; loading
    (resolve_model_dir) reads the cache at that commit. A gated model (the Llama models) needs a
    token: `huggingface-cli login` or HF_TOKEN, and its licence accepted on the model page."""
    from huggingface_hub import snapshot_download

    from .io import atomic_dir

    snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(HUB_PATTERNS)))
    pointer = {"repo_id": repo_id, "revision": revision, "commit": snapshot.name,
               "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None}
    with atomic_dir(out_dir) as staging:
        (Path(staging) / HUB_POINTER).write_text(json.dumps(pointer, indent=1) + "\n", encoding="utf-8")
    return pointer


def resolve_model_dir(name_or_path: str | Path) -> str:
    """The folder to load a model from: for a folder holding hub.json (download_hub_model), the
    Hugging Face cache's snapshot at the recorded commit, found without network; else as given."""
    pointer_path = Path(name_or_path) / HUB_POINTER
    if not pointer_path.is_file():
        return str(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    pointer = json.loads(pointer_path.read_text(encoding="utf-8"))
    try:
        return snapshot_download(pointer["repo_id"], revision=pointer["commit"], cache_dir=pointer.get("cache_dir"),
                                 allow_patterns=list(HUB_PATTERNS), local_files_only=True)
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{pointer_path}: {pointer['repo_id']} at commit {pointer['commit']} is not in the Hugging Face cache "
            f"({pointer.get('cache_dir') or 'HF_HUB_CACHE'}); the jobs must see the cache the prepare_model job wrote "
            f"(set HF_HOME/HF_HUB_CACHE to a shared folder), or delete {pointer_path.parent} to download it again"
        ) from error


def use_tf32(dtype: str | torch.dtype, device: str | torch.device, enabled: bool = True) -> bool | None:
    """Whether fp32 matrix products on `device` may use TF32 (10-bit mantissa inputs, fp32
    accumulation; about 8x the fp32 rate on A100/H100): True for a float32 model on a CUDA device
    when `enabled` (config model.tf32, default true), False there when not; None (leave torch's
    settings alone) for other dtypes and devices. Code that needs full fp32 products (the
    statistics' Gram matrices) turns TF32 off around them itself."""
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if torch.device(device).type != "cuda" or torch_dtype != torch.float32:
        return None
    return bool(enabled)


def _fp32_precision_flags() -> list[tuple[object, str, object, object]]:
    """(settings object, attribute, TF32 value, full-fp32 value) of torch's CUDA matmul and cuDNN
    convolution precision: the fp32_precision API where torch has it (once it is used, reading the
    legacy allow_tf32 flags raises), else the legacy allow_tf32 flags."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return [(matmul, "fp32_precision", "tf32", "ieee"), (conv.conv, "fp32_precision", "tf32", "ieee")]
    return [(matmul, "allow_tf32", True, False), (conv, "allow_tf32", True, False)]


def set_tf32(allow: bool | None) -> None:
    """Apply use_tf32's decision to torch's CUDA matmul and cuDNN settings (None: unchanged)."""
    if allow is None:
        return
    for settings, attribute, tf32, full in _fp32_precision_flags():
        setattr(settings, attribute, tf32 if allow else full)


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Matrix products in full IEEE fp32 inside the block (TF32 off), the previous settings after
    it: for sums whose small terms matter (the statistics' Gram matrices), while the model's own
    forward may run in TF32. CPU products never use TF32: there this changes nothing."""
    flags = _fp32_precision_flags()
    before = [getattr(settings, attribute) for settings, attribute, _, _ in flags]
    for settings, attribute, _, full in flags:
        setattr(settings, attribute, full)
    try:
        yield
    finally:
        for (settings, attribute, _, _), value in zip(flags, before, strict=True):
            setattr(settings, attribute, value)


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    tf32: bool = True,
):
    """Load a HF causal LM and its tokenizer (hub id, local folder, or a prepared folder holding a
    hub.json pointer into the Hugging Face cache), eval mode, right padding.

    The weights are loaded in `dtype` straight onto `device` (no full-size host copy for a GPU).
    For a float32 model on CUDA, TF32 products are on unless `tf32` is false (use_tf32).
    A missing pad token is set to EOS (all scoring uses explicit attention masks).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_dir(name_or_path)
    if source != str(name_or_path):
        revision = None  # the snapshot folder is the pinned commit
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    on_cpu = torch.device(device).type == "cpu"
    placement = {} if on_cpu else {"device_map": str(device)}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision, **placement)
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    set_tf32(use_tf32(torch_dtype, device, tf32))
    tokenizer = load_tokenizer(source, revision)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The tokenizer of a model folder or hub id.

    A folder whose tokenizer is the generic one (its tokenizer.json is the whole tokenizer, as for
    the toy models built here) is loaded exactly as saved: `AutoTokenizer` would otherwise build
    the model type's own tokenizer class around the vocabulary (e.g. Qwen2's pre-tokenizer for a
    qwen2 model), which splits text differently from the tokenizer the model was trained with.
    """
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    config = Path(name_or_path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") in GENERIC_TOKENIZERS:
        return TokenizersBackend.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path, revision=revision)


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of a model: its config plus a cheap digest of every parameter.

    Two models with different weights (e.g. retrained, or edited) get different fingerprints,
    so caches keyed on it are never reused for the wrong model.
    """
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            head = flat[:64].float().cpu().numpy().tobytes()
            stats = torch.stack([flat.float().sum(), flat.float().abs().sum()]).cpu().double().numpy().tobytes()
            digest.update(name.encode() + head + stats)
    return digest.hexdigest()[:16]


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


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states (B, T, d) without computing logits for every position."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@torch.no_grad()
def prefix_key_values(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                      groups: int = 4, return_hidden: bool = False, share_stems: bool = False,
                      own_blocks: bool = False):
    """Per-layer (keys, values) of right-padded prefixes, for `final_hidden_after`; None if empty.

    No padding mask: with causal attention and pads at the end, valid positions never see a pad,
    and pad positions stay finite (they are masked out when the continuation reads the cache).
    With `lengths` (each row's real prefix length), the rows run in up to `groups` passes of
    similar lengths, each padded only to its own longest row; the pads beyond it are zeros.
    With `share_stems` too, rows that start with the same tokens (`shared_stems`) run those tokens
    once and continue from their cache (same keys and values at every real position; only where
    `continuation_exact` holds, else as without it).
    With `own_blocks`, on models `upper_blocks.runs_on`, the pass runs forward only on the prepared
    weights of `editlib.upper_blocks` (its `prefix_key_values`: one product per layer over every
    token, no pads; the same keys and values to float rounding, zeros at the pads).
    With `return_hidden` (one pass only), also the final hidden states (B, P, d): (cache, hidden).
    """
    if return_hidden:
        return _prefix_pass(model, input_ids)
    if input_ids.shape[1] == 0:
        return None
    if own_blocks:
        from . import upper_blocks  # it imports this module

        if upper_blocks.runs_on(model):
            lengths = torch.full((len(input_ids),), input_ids.shape[1]) if lengths is None else lengths
            rows = [ids[:n] for ids, n in zip(input_ids.tolist(), lengths.tolist())]
            return upper_blocks.prefix_key_values(model, input_ids, lengths, shared_stems(rows) if share_stems else [])
    if lengths is None:
        return _prefix_pass(model, input_ids)[0]
    lengths = lengths.to(input_ids.device)
    if share_stems and continuation_exact(model, 2 * input_ids.shape[1]):
        rows = [ids[:n] for ids, n in zip(input_ids.tolist(), lengths.tolist())]
        stems = shared_stems(rows)
        if stems:
            return _stem_prefix_pass(model, input_ids, lengths, stems, groups)
    return _length_grouped_pass(model, input_ids, lengths, groups)


def shared_stems(rows: Sequence[Sequence[int]], min_shared: int = 2) -> list[tuple[list[int], int]]:
    """Groups of rows that start with the same tokens: (row indices, stem length) with every row of
    a group starting with the same `stem length` >= `min_shared` tokens and longer than them.

    Chosen to save the most tokens (stem length x (rows - 1), summed over groups): the rows sorted,
    each run of rows is either one group (the run's common start) or split where that start is
    shortest, whichever saves more. Rows in no group are left out.
    """
    order = sorted(range(len(rows)), key=lambda r: tuple(rows[r]))
    common = [_common_start(rows[a], rows[b]) for a, b in zip(order, order[1:])]

    def best(lo: int, hi: int) -> tuple[int, list[tuple[list[int], int]]]:  # order[lo..hi]
        if lo == hi:
            return 0, []
        shortest = min(common[lo:hi])
        members = order[lo: hi + 1]
        stem = min(shortest, min(len(rows[r]) for r in members) - 1)
        whole = (stem * (hi - lo), [(members, stem)]) if stem >= min_shared else (0, [])
        saved, found, start = 0, [], lo
        for cut in [i for i in range(lo, hi) if common[i] == shortest] + [hi]:
            part_saved, part_groups = best(start, cut)
            saved, found, start = saved + part_saved, found + part_groups, cut + 1
        return whole if whole[0] >= saved else (saved, found)

    return best(0, len(rows) - 1)[1] if rows else []


def _common_start(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _length_grouped_pass(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor, groups: int):
    if groups <= 1 or len(lengths) < 2 * groups:
        return _prefix_pass(model, input_ids)[0]
    parts = [(rows, _prefix_pass(model, input_ids[rows, : max(1, int(lengths[rows].max()))])[0])
             for rows in torch.argsort(lengths, stable=True).tensor_split(groups)]
    merged = []
    for layer in range(len(parts[0][1])):  # each cache tensor is (rows, heads, positions, head dim)
        tensors = []
        for k, like in enumerate(parts[0][1][layer]):
            full = like.new_zeros(len(lengths), *like.shape[1:-2], input_ids.shape[1], like.shape[-1])
            for rows, cache in parts:
                full[rows, ..., : cache[layer][k].shape[-2], :] = cache[layer][k]
            tensors.append(full)
        merged.append(tuple(tensors))
    return merged


def _stem_prefix_pass(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                      stems: list[tuple[list[int], int]], groups: int):
    """`prefix_key_values` with each group's shared stem run once: the stems in one length-grouped
    pass, then every row's rest (a row in no group: all of it) in passes of similar rest length
    that read their stem's cache, the result laid out as one right-padded pass would be."""
    device = input_ids.device
    stem_of = torch.zeros(len(lengths), dtype=torch.long, device=device)
    stem_len = torch.zeros(len(lengths), dtype=torch.long, device=device)
    for index, (members, length) in enumerate(stems):
        stem_of[members], stem_len[members] = index, length
    stem_lengths = torch.tensor([n for _, n in stems], device=device)
    stem_ids = input_ids[[members[0] for members, _ in stems], : int(stem_lengths.max())]
    stem_cache = _length_grouped_pass(model, stem_ids, stem_lengths, groups)
    rest_len = (lengths - stem_len).clamp(min=1)
    n_positions = input_ids.shape[1]
    merged = None
    for rows in torch.argsort(rest_len, stable=True).tensor_split(min(groups, len(lengths))):
        if len(rows) == 0:
            continue
        width, past_width = int(rest_len[rows].max()), int(stem_len[rows].max())
        offset = torch.arange(width, device=device)
        source = (stem_len[rows, None] + offset).clamp(max=n_positions - 1)
        ids = input_ids[rows[:, None], source]
        if past_width == 0:
            layers = _prefix_pass(model, ids)[0]
        else:
            past = [tuple(t[stem_of[rows], ..., :past_width, :] for t in layer[:2]) for layer in stem_cache]
            mask = torch.cat([torch.arange(past_width, device=device) < stem_len[rows, None],
                              torch.ones(len(rows), width, dtype=torch.bool, device=device)], dim=1).long()
            output = model.base_model(input_ids=ids, attention_mask=mask, position_ids=stem_len[rows, None] + offset,
                                      past_key_values=DynamicCache(ddp_cache_data=past), use_cache=True)
            layers = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        # position p of a row: its stem's slot p below its stem length, else slot past_width + p - stem length
        position = torch.arange(n_positions, device=device)
        slot = torch.where(position < stem_len[rows, None], position, past_width + position - stem_len[rows, None])
        computed = position < stem_len[rows, None] + width
        slot = torch.where(computed, slot, 0)
        if merged is None:
            merged = [tuple(t.new_zeros(len(lengths), *t.shape[1:-2], n_positions, t.shape[-1]) for t in layer)
                      for layer in layers]
        for full_layer, layer in zip(merged, layers):
            for full, tensor in zip(full_layer, layer):
                moved = tensor.movedim(-2, 1)  # (rows, positions, heads..., head dim)
                picked = moved[torch.arange(len(rows), device=device)[:, None], slot]
                picked[~computed] = 0
                full[rows] = picked.movedim(1, -2)
    return merged


def _prefix_pass(model: nn.Module, input_ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """One pass over the prefixes: per-layer (keys, values) and the final hidden states."""
    # a plain cache keeps every position in every layer (a sliding-window layer's own cache would
    # drop the oldest ones); sliding masks are applied from positions when the cache is read back
    output = model.base_model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True)
    return [(layer.keys, layer.values) for layer in output.past_key_values.layers], output.last_hidden_state


def split_rows(model: nn.Module, rows: Sequence[Sequence[int]], split: torch.Tensor, pad: int, device,
               share_stems: bool = True, own_blocks: bool = True):
    """Token rows cut at `split` (R,): the prefixes run once into a key/value cache
    (`prefix_key_values` with their lengths), the rests right-padded for `final_hidden_after`.
    Returns (prefix mask (R, P), the rests (`tokens.PaddedBatch`), the cache, the rests' positions (R, T))."""
    from .tokens import pad_right

    cuts = split.tolist()
    prefix = pad_right([ids[:s] for ids, s in zip(rows, cuts)], pad).to(device)
    rest = pad_right([ids[s:] for ids, s in zip(rows, cuts)], pad).to(device)
    cache = prefix_key_values(model, prefix.input_ids, lengths=split, share_stems=share_stems, own_blocks=own_blocks)
    position_ids = split.to(device)[:, None] + torch.arange(rest.input_ids.shape[1], device=device)
    return prefix.attention_mask, rest, cache, position_ids


def continuation_exact(model: nn.Module, longest: int) -> bool:
    """Whether a cached prefix + continuation gives the logits of the whole row on `model`.

    Sliding-window layers mask by cache index, which padded prefixes shift, so this holds only when
    the longest padded prefix + continuation (`longest` positions) fits within the window (then the
    window masks nothing) or the window is one token (each token sees only itself).
    """
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return not (window and window > 1 and longest > window)


def final_hidden_after(
    model: nn.Module,
    prefix: list[tuple[torch.Tensor, ...]] | None,
    prefix_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states (B, T, d) of continuations of cached prefixes (see `prefix_key_values`).

    `prefix_mask` (B, P) marks each row's real prefix tokens; `position_ids` (B, T) continue them.
    The cache is rebuilt from the prefix tensors on every call, so they are never modified.
    """
    if prefix is None:
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids).last_hidden_state
    cache = DynamicCache(ddp_cache_data=prefix)
    mask = torch.cat([prefix_mask, attention_mask], dim=1)
    return model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True).last_hidden_state


def _tensor_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_tensor(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextlib.contextmanager
def capture_inputs(model: nn.Module, module_names: Sequence[str], stop_after: str | None = None) -> Iterator[dict]:
    """Record the (first positional) input of each named module on the next forward passes.

    Yields a dict name -> tensor (the latest pass). With `stop_after`, the forward raises
    StopForward once that module has run; callers wrap the call in `suppress(StopForward)`.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in module_names:
        module = model.get_submodule(name)

        def pre_hook(mod, args, kwargs, name=name):
            captured[name] = args[0] if args else next(iter(kwargs.values()))

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with stop_forward_after(model, stop_after):
            yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def stop_forward_after(model: nn.Module, module_name: str | None) -> Iterator[None]:
    """Make forward passes raise StopForward once `module_name` has run (None: no stop).

    Enter it after any other hooks on the same module, so theirs run first.
    """
    if module_name is None:
        yield
        return

    def stop_hook(mod, args, output):
        raise StopForward

    handle = model.get_submodule(module_name).register_forward_hook(stop_hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_outputs(model: nn.Module, module_names: Sequence[str]) -> Iterator[dict]:
    """Record the output tensor of each named module on the next forward passes."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in module_names:
        def hook(mod, args, output, name=name):
            captured[name] = _tensor_of(output)

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edit_output(model: nn.Module, module_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's output tensor by fn(output) during forward passes (tuple or tensor)."""

    def hook(mod, args, output):
        return _replace_tensor(output, fn(_tensor_of(output)))

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def block_index(model: nn.Module, module_name: str) -> int:
    """Index of the transformer block that is or contains module `module_name`."""
    layout = model_layout(model)
    for layer in range(layout.n_layers):
        block = layout.block(layer)
        if module_name == block or module_name.startswith(block + "."):
            return layer
    raise ValueError(f"{module_name!r} is not inside a transformer block of this {layout.model_type} model")


@contextlib.contextmanager
def replay_blocks_below(model: nn.Module, module_name: str) -> Iterator[None]:
    """Run the blocks below the one holding `module_name` once, then replay their outputs.

    The first forward pass in the context records every lower block's output; later passes return
    the recorded outputs without computing them. Valid only when every pass has the same inputs
    and nothing below that block changes between passes, as in target optimisation, where the
    optimised vector enters at `module_name` and the prompts are fixed.
    """
    blocks = [model.get_submodule(model_layout(model).block(i)) for i in range(block_index(model, module_name))]
    recorded: dict[int, object] = {}
    handles = []

    def record(index: int):
        def hook(module, args, output):
            recorded[index] = output
            if index == len(blocks) - 1:  # every lower block is recorded: replay from the next pass on
                for i, block in enumerate(blocks):
                    block.forward = lambda *args, _i=i, **kwargs: recorded[_i]
                for handle in handles:
                    handle.remove()
        return hook

    try:
        handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            block.__dict__.pop("forward", None)


def run_until(model: nn.Module, stop_after: str | None, **inputs) -> None:
    """Forward pass that stops after module `stop_after` (use inside capture contexts)."""
    with stop_forward_after(model, stop_after), contextlib.suppress(StopForward):
        model(**inputs)
