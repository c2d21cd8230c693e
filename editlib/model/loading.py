"""Loading models and tokenizers: local folders, hub snapshots at a pinned revision, dtype and
TF32 settings, and a content fingerprint of the loaded weights."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

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

    from editlib.io import atomic_dir

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
