"""The blocks above an edited layer of a Llama model, as one function of that layer's output.

Target optimisation adds the optimised vector at one layer's output and runs everything above it
at every Adam step, over a few tokens per prompt (the subject's last token onwards) against a
cached prefix, forward and backward. Through transformers' modules each step pays, besides the
matrix products, for dozens of small operations per block (layout copies, the key/value cache
concatenation, the mask, autograd's bookkeeping, the copies of keys and values per query head).
Here each block is one autograd function with a hand-written backward (gradients for the hidden
states only; the weights are fixed):

- the query/key/value projections are one product, and so are the gate and up projections,
  each carrying the weight of the RMSNorm before it;
- the prepared weights are kept while a block's parameters are unchanged, so every chunk and
  every job on the same weights reuses them; the backward multiplies by the same matrices;
- rotary embedding is one complex multiplication: the query and key dimensions are reordered
  once (in the weights and the cached prefix keys) so that the pairs it rotates are adjacent,
  which leaves every attention score unchanged; the 1/sqrt(head_dim) scaling rides along;
- the products run on the real tokens alone, one matrix of them (rows of different lengths leave
  no pads in it); only attention reads the rows' padded layout;
- for `MLP_WEIGHT_MAJOR_TOKENS` tokens the MLP runs weight-major, its activations laid out
  (features, tokens): W @ x^T, which BLAS runs faster than x @ W^T at those shapes;
- each row's keys and values sit in one buffer per block, the cached prefix's followed by the new
  tokens', which each forward pass writes, positions last; the query heads that share a
  key/value head are stacked along the query axis.

`prefix_key_values` runs the prefix pass on the same prepared weights, forward only, every token
of a layer in one product. Only for Llama blocks in fp32 on CPU (SmolLM2, Llama-2, Llama-3; other
devices and dtypes are not tested): `runs_on` and `supports` say whether a model qualifies. The prepared copies (the concatenated
projections) stay in memory while the model does. `llama_block` is the same block written with
plain differentiable operations; the tests check the fast block's output and gradient against it
and against the model's own forward pass (tests/test_upper_blocks.py).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from editlib.model.layout import model_layout
from editlib.model.tokens import ragged_index


def runs_on(model: nn.Module) -> bool:
    """Whether the own blocks can run `model`: an fp32 Llama model on CPU with SiLU MLPs without
    biases and no sliding window."""
    config = model.config
    if getattr(config, "model_type", None) != "llama" or getattr(config, "hidden_act", None) != "silu":
        return False
    if getattr(config, "mlp_bias", False) or getattr(config, "sliding_window", None):
        return False
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def supports(model: nn.Module, hook_module: str) -> bool:
    """Whether the blocks above `hook_module` can run here: `runs_on(model)`, hooked at a block
    output or at an MLP output (which its block adds to the residual last, so the block's output
    moves by the same vector)."""
    if not runs_on(model):
        return False
    layout = model_layout(model)
    return any(hook_module in (layout.block(layer), layout.mlp(layer)) for layer in range(layout.n_layers))


def _pair_order(dim: int) -> torch.Tensor:
    """Reordering of a head's dimensions that puts each rotary pair (i, i + dim/2) side by side."""
    half = torch.arange(dim // 2)
    return torch.stack([half, half + dim // 2], dim=1).flatten()


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_backward(grad: torch.Tensor, normed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gradient at x of normed = x * scale, scale = rsqrt(mean(x^2) + eps), given grad at normed."""
    return scale * (grad - normed * (grad * normed).mean(-1, keepdim=True))


# token counts (N) for which the MLP's products run weight-major, (2I, d) @ (d, N), instead of
# (N, d) @ (d, 2I): on SmolLM2's MLP shapes, 2 cores, MKL, the MLP forward and backward 1.05-1.14x
# faster at 16-416 tokens, as fast at 512, 0.93x at 700, 0.78x at 13 (bench/mlp_layout.py,
# docs/performance.md); z on SmolLM2 came out the same to the bit either way
MLP_WEIGHT_MAJOR_TOKENS = range(16, 512)


def _versions(module: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


class _Prepared:
    """Prepared weights per module, kept while the module's parameters are unchanged (same storage
    and version): chunks and jobs on the same weights share them, an edited block prepares anew."""

    def __init__(self):
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, module: nn.Module, build):
        versions = _versions(module)
        entry = self.entries.get(module)
        if entry is None or entry[0] != versions:
            entry = self.entries[module] = (versions, build())
        return entry[1]


_PREPARED = _Prepared()


class _BlockWeights:
    """One Llama block's weights, prepared once: the query/key/value and the gate/up projections
    concatenated, query and key rows in rotary-pair order, each RMSNorm's weight folded into the
    product after it (norm(x) * w @ W^T = norm(x) @ (W diag(w))^T). Products are x @ W^T forward
    and grad @ W backward, on the same contiguous W."""

    def __init__(self, block: nn.Module, heads: int, kv_heads: int, dim: int):
        attn, mlp = block.self_attn, block.mlp
        order = _pair_order(dim)

        def rotary_rows(linear: nn.Linear, n_heads: int):
            weight = linear.weight.view(n_heads, dim, -1)[:, order].reshape(n_heads * dim, -1)
            bias = None if linear.bias is None else linear.bias.view(n_heads, dim)[:, order].reshape(-1)
            return weight, bias

        with torch.no_grad():
            (q_weight, q_bias), (k_weight, k_bias) = rotary_rows(attn.q_proj, heads), rotary_rows(attn.k_proj, kv_heads)
            self.qkv = torch.cat([q_weight, k_weight, attn.v_proj.weight]) * block.input_layernorm.weight
            biases = (q_bias, k_bias, attn.v_proj.bias)
            self.qkv_bias = None if any(b is None for b in biases) else torch.cat(biases)
            self.out, self.out_bias = attn.o_proj.weight.detach(), attn.o_proj.bias
            self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * block.post_attention_layernorm.weight
            self.down = mlp.down_proj.weight.detach()
        self.eps = block.input_layernorm.variance_epsilon


class _Block:
    """One block for one chunk: its prepared weights, and every row's keys and values, the cached
    prefix's (P positions, keys in pair order) followed by room for the `length` new tokens', which
    each forward pass writes (pads stay zero), so that attention reads one key and one value tensor per row.
    Both are laid out (R, K, D, P + T), positions last: the attention's batched products of a few
    rows each ran 1.12-1.14x faster on them than on (R, K, P + T, D) at z's chunks on SmolLM2, with
    the same results to the bit (bench/attention_layout.py)."""

    def __init__(self, weights: _BlockWeights, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, length: int):
        self.__dict__.update(weights.__dict__)
        rows, kv_heads, prefix, dim = prefix_keys.shape
        self.prefix = prefix
        self.keys = prefix_keys.new_zeros(rows, kv_heads, dim, prefix + length)
        self.keys[..., :prefix] = prefix_keys[..., _pair_order(dim)].transpose(-1, -2)
        self.values = prefix_values.new_zeros(rows, kv_heads, dim, prefix + length)
        self.values[..., :prefix] = prefix_values.transpose(-1, -2)
        self.written_by = None  # the forward pass whose new keys and values the buffers hold


def _complex(t: torch.Tensor) -> torch.Tensor:
    """A view of `t` (..., D) as (..., D/2) complex numbers (adjacent pairs)."""
    return torch.view_as_complex(t.unflatten(-1, (-1, 2)))


def mlp_forward(block: "_BlockWeights", normed: torch.Tensor, hidden: torch.Tensor, weight_major: bool):
    """A block's MLP with its residual: hidden + down(silu(gate) * up), (gate, up) = gate_up(normed),
    for N tokens (N, d). Returns that (N, d) and (gate, up, silu) for `mlp_backward`, laid out
    (I, N) when `weight_major` (W @ x^T products), else (N, I)."""
    if weight_major:
        gate, up = (block.gate_up @ normed.T).chunk(2, dim=0)
    else:
        gate, up = F.linear(normed, block.gate_up).chunk(2, dim=-1)
    silu = F.silu(gate)
    if weight_major:
        return torch.add(hidden, (block.down @ (silu * up)).T), gate, up, silu
    return F.linear(silu * up, block.down).add_(hidden), gate, up, silu


def mlp_backward(block: "_BlockWeights", grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                 silu: torch.Tensor, weight_major: bool) -> torch.Tensor:
    """The gradient at `normed` of `mlp_forward`'s MLP term, given `grad_out` (N, d) contiguous at
    its output and the forward's (gate, up, silu) in the forward's layout."""
    if weight_major:
        grad_act = block.down.T @ grad_out.T  # (I, N)
        grad_gate_up = grad_act.new_empty(2 * grad_act.shape[0], grad_act.shape[1])
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=0)
    else:
        grad_act = grad_out @ block.down  # (N, I)
        grad_gate_up = grad_act.new_empty(grad_act.shape[0], 2 * grad_act.shape[1])
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
    torch.mul(grad_act, silu, out=grad_up)
    torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_gate)
    return grad_gate_up.T @ block.gate_up if weight_major else grad_gate_up @ block.gate_up


class _BlockFunction(torch.autograd.Function):
    """y = block(x) for the N real tokens x (N, d), with its backward for x; `chunk` holds the
    shared parts. Every product runs on the N tokens alone; only attention reads the rows' padded
    layout (R, T), token i at row `chunk.token_row[i]`, slot `chunk.token_slot[i]`."""

    @staticmethod
    def forward(ctx, x, block: _Block, chunk: "UpperBlocks"):
        tokens, width = x.shape
        heads, kv_heads, dim = chunk.heads, chunk.kv_heads, chunk.head_dim
        groups, prefix, rows, length = heads // kv_heads, block.prefix, chunk.rows, chunk.length
        row, slot = chunk.token_row, chunk.token_slot
        scale1 = _rms(x, block.eps)
        normed1 = x * scale1
        projected = F.linear(normed1, block.qkv)
        if block.qkv_bias is not None:
            projected = projected + block.qkv_bias
        query, key, value = projected.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        # query head h = k * groups + g reads key/value head k: its groups stacked along the query
        # axis, (R, K, G * T, D), pads zero; rotary embedding with the query scaling folded in
        rotated = _complex(query.view(tokens, kv_heads, groups, dim)) * chunk.rotation[:, None, None]
        grid = x.new_zeros(rows, kv_heads, groups, length, dim)
        grid[row, :, :, slot] = torch.view_as_real(rotated).flatten(-2)
        query = grid.view(rows, kv_heads, groups * length, dim)
        rotated = _complex(key.view(tokens, kv_heads, dim)) * chunk.key_rotation[:, None]
        block.keys[row, :, :, prefix + slot] = torch.view_as_real(rotated).flatten(-2)
        block.values[row, :, :, prefix + slot] = value.view(tokens, kv_heads, dim)
        ctx.token = block.written_by = object()
        probs = torch.softmax((query @ block.keys).add_(chunk.bias), dim=-1)
        attended = (probs @ block.values.transpose(-1, -2)).view(rows, kv_heads, groups, length, dim)[row, :, :, slot]
        hidden = F.linear(attended.reshape(tokens, heads * dim), block.out)
        if block.out_bias is not None:
            hidden = hidden + block.out_bias
        hidden.add_(x)
        scale2 = _rms(hidden, block.eps)
        normed2 = hidden * scale2
        weight_major = tokens in MLP_WEIGHT_MAJOR_TOKENS
        out, gate, up, silu = mlp_forward(block, normed2, hidden, weight_major)
        ctx.block, ctx.chunk, ctx.weight_major = block, chunk, weight_major
        ctx.save_for_backward(normed1, scale1, query, probs, normed2, scale2, gate, up, silu)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        block, chunk = ctx.block, ctx.chunk
        if block.written_by is not ctx.token:
            raise RuntimeError("upper_blocks: a block ran forward again before this backward pass (its new "
                               "keys and values are overwritten); run each backward before the next forward")
        normed1, scale1, query, probs, normed2, scale2, gate, up, silu = ctx.saved_tensors
        tokens, width = grad_out.shape
        heads, kv_heads, dim = chunk.heads, chunk.kv_heads, chunk.head_dim
        groups, prefix, rows, length = heads // kv_heads, block.prefix, chunk.rows, chunk.length
        row, slot = chunk.token_row, chunk.token_slot
        grad_out = grad_out.contiguous()
        grad_normed2 = mlp_backward(block, grad_out, gate, up, silu, ctx.weight_major)
        grad_hidden = grad_out + _rms_backward(grad_normed2, normed2, scale2)
        # attention: hidden = x + out(attended), in the rows' padded layout (pads zero)
        grad_attended = grad_out.new_zeros(rows, kv_heads, groups, length, dim)
        grad_attended[row, :, :, slot] = (grad_hidden @ block.out).view(tokens, kv_heads, groups, dim)
        grad_attended = grad_attended.view(rows, kv_heads, groups * length, dim)
        grad_probs = grad_attended @ block.values
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        grad_query = (grad_scores @ block.keys.transpose(-1, -2)).view(rows, kv_heads, groups, length, dim)[row, :, :, slot]
        grad_key = (grad_scores[..., prefix:].transpose(-1, -2) @ query)[row, :, slot]  # (N, K, D)
        grad_value = (probs[..., prefix:].transpose(-1, -2) @ grad_attended)[row, :, slot]
        # back through the rotation into one (N, q + k + v) gradient, each part written in place
        grad_projected = grad_out.new_empty(tokens, (heads + 2 * kv_heads) * dim)
        grad_q, grad_k, grad_v = grad_projected.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        torch.mul(_complex(grad_query), chunk.rotation[:, None, None].conj(),
                  out=_complex(grad_q.view(tokens, kv_heads, groups, dim)))
        torch.mul(_complex(grad_key), chunk.key_rotation[:, None].conj(), out=_complex(grad_k.view(tokens, kv_heads, dim)))
        grad_v.view(tokens, kv_heads, dim).copy_(grad_value)
        grad_normed1 = grad_projected @ block.qkv
        return grad_hidden + _rms_backward(grad_normed1, normed1, scale1), None, None


class UpperBlocks:
    """Blocks `layer + 1 ..` of a Llama `model` and its final norm, over continuation tokens.

    `prefix` holds every layer's cached (keys, values) (R, K, P, D) of right-padded prefixes
    (`models.prefix_key_values`, or None: no prefix), `prefix_mask` (R, P) their real tokens,
    `attention_mask` (R, T) the continuation's real tokens and `position_ids` (R, T) their
    positions. Calling it with block `layer`'s output at the continuation tokens (R, T, d) returns
    the final-norm hidden states (zero at pads), differentiable in that input. Only the real
    tokens run through the blocks' products.
    """

    def __init__(self, model: nn.Module, layer: int, prefix, prefix_mask: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor):
        config = model.config
        base = model.base_model
        self.heads, self.kv_heads, self.head_dim = _dims(model)
        self.rows, self.length = attention_mask.shape
        self.token_row, self.token_slot = attention_mask.bool().nonzero(as_tuple=True)
        sample = base.norm.weight.new_zeros(1, len(self.token_row), config.hidden_size)
        if prefix is None:  # no cached prefix: an empty one
            empty = sample.new_zeros(self.rows, self.kv_heads, 0, self.head_dim)
            prefix = [(empty, empty)] * len(base.layers)
            prefix_mask = attention_mask.new_zeros(self.rows, 0)
        self.blocks = [_Block(_prepared(model, index), *prefix[index][:2], self.length)
                       for index in range(layer + 1, len(base.layers))]
        self.final_norm, self.eps = base.norm.weight, base.norm.variance_epsilon
        cos, sin = base.rotary_emb(sample, position_ids[self.token_row, self.token_slot][None])
        self.key_rotation, self.rotation = _rotations(model, cos[0], sin[0])  # (N, D/2)
        visible = torch.cat([prefix_mask.bool()[:, None, :].expand(self.rows, self.length, -1),
                             torch.ones(self.length, self.length, dtype=torch.bool, device=sample.device).tril()
                             & attention_mask.bool()[:, None, :]], dim=-1)
        self.bias = _grouped_bias(visible, self.heads // self.kv_heads, sample.dtype)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        index = (self.token_row, self.token_slot)
        tokens = hidden[index]
        for block in self.blocks:
            tokens = _BlockFunction.apply(tokens, block, self)
        tokens = F.rms_norm(tokens, tokens.shape[-1:], self.final_norm, self.eps)
        return tokens.new_zeros(hidden.shape).index_put(index, tokens)


def _dims(model: nn.Module) -> tuple[int, int, int]:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def _rotations(model: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The complex rotary factors (..., D/2) for keys, and for queries with the attention scaling
    folded in, from the rotary embedding's `cos`, `sin` (..., D) (both halves equal)."""
    dim = _dims(model)[2]
    key_rotation = torch.complex(cos[..., : dim // 2], sin[..., : dim // 2])
    return key_rotation, key_rotation * getattr(model.base_model.layers[0].self_attn, "scaling", dim**-0.5)


def _grouped_bias(visible: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention bias (R, 1, G * T, S) of `visible` (R, T, S), repeated for the `groups`
    query heads that share a key head (queries laid out group by group)."""
    rows, length, width = visible.shape
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
    return bias[:, None, None].expand(-1, -1, groups, -1, -1).reshape(rows, 1, groups * length, width)


def _prepared(model: nn.Module, index: int) -> _BlockWeights:
    layers = model.base_model.layers
    return _PREPARED.get(layers[index], lambda: _BlockWeights(layers[index], *_dims(model)))


@torch.no_grad()
def prefix_key_values(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                      stems: list[tuple[list[int], int]] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) (R, K, P, D) of right-padded prefixes `input_ids` (R, P) with
    real `lengths` (R,), forward only on the prepared weights (`runs_on(model)`), for
    `models.prefix_key_values`: the same keys and values at every real position, zeros beyond.

    Each of `stems` (row indices, stem length; `models.shared_stems`) runs its shared tokens once;
    its rows continue from them. Layer by layer, every token that runs (each stem's, then each
    row's rest, no pads) goes through the products as one matrix; only attention reads the rows'
    padded layout. The last block runs only as far as its keys and values.
    """
    base = model.base_model
    heads, kv_heads, dim = _dims(model)
    groups = heads // kv_heads
    device = input_ids.device
    rows, width = input_ids.shape
    lengths = lengths.to(device).clamp(max=width)
    stem_len = torch.zeros(rows, dtype=torch.long, device=device)
    stem_of = torch.full((rows,), -1, dtype=torch.long, device=device)
    for index, (members, length) in enumerate(stems):
        stem_len[members], stem_of[members] = length, index
    # the tokens that run: each stem's from its first row, then each row's own; a query row each
    query_row = torch.tensor([members[0] for members, _ in stems] + list(range(rows)), dtype=torch.long, device=device)
    start = torch.cat([torch.zeros(len(stems), dtype=torch.long, device=device), stem_len])
    end = torch.cat([torch.tensor([n for _, n in stems], dtype=torch.long, device=device), lengths])
    count = (end - start).clamp(min=0)
    token_query, token_slot = ragged_index(count)
    token_pos = start[token_query] + token_slot
    token_row = query_row[token_query]
    # where each row's position p reads its keys from: its stem's token below the stem length, else its own
    first = torch.cat([count.new_zeros(1), count.cumsum(0)[:-1]])
    position = torch.arange(width, device=device)
    in_stem = position < stem_len[:, None]
    source = torch.where(in_stem, first[stem_of.clamp(min=0)][:, None] + position,
                         first[len(stems) + torch.arange(rows, device=device)][:, None] + position - stem_len[:, None])
    real = position < lengths[:, None]
    source = torch.where(real, source, 0)

    hidden = base.embed_tokens(input_ids[token_row, token_pos])  # (N, d)
    cos, sin = base.rotary_emb(hidden[None], token_pos[None])
    key_rotation, rotation = _rotations(model, cos[0], sin[0])  # (N, D/2)
    n_queries, query_width = len(query_row), int(count.max()) if len(count) else 0
    # queries laid out (Q, K, G * W, D); query j of a row sees positions <= its own
    query_pos = start[:, None] + torch.arange(query_width, device=device)
    bias = _grouped_bias(position[None, None, :] <= query_pos[:, :, None], groups, hidden.dtype)  # (Q, 1, G * W, P)
    back = torch.argsort(_pair_order(dim))
    layers = []
    for index in range(len(base.layers)):
        block = _prepared(model, index)
        projected = F.linear(hidden * _rms(hidden, block.eps), block.qkv)
        if block.qkv_bias is not None:
            projected = projected + block.qkv_bias
        query, key, value = projected.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        key = torch.view_as_real(_complex(key.view(-1, kv_heads, dim)) * key_rotation[:, None]).flatten(-2)
        value = value.reshape(-1, kv_heads, dim)
        keys = key[source].masked_fill_(~real[..., None, None], 0).transpose(1, 2)  # (R, K, P, D), pair order
        values = value[source].masked_fill_(~real[..., None, None], 0).transpose(1, 2)
        layers.append((keys[..., back].contiguous(), values.contiguous()))
        if index == len(base.layers) - 1:
            break
        query = torch.view_as_real(_complex(query.reshape(-1, heads, dim)) * rotation[:, None]).flatten(-2)
        grid = query.new_zeros(n_queries, query_width, heads, dim)
        grid[token_query, token_slot] = query
        grid = grid.view(n_queries, query_width, kv_heads, groups, dim).permute(0, 2, 3, 1, 4).reshape(
            n_queries, kv_heads, groups * query_width, dim)
        probs = torch.softmax((grid @ keys[query_row].transpose(-1, -2)).add_(bias), dim=-1)
        attended = (probs @ values[query_row]).view(n_queries, kv_heads, groups, query_width, dim)
        attended = attended.permute(0, 3, 1, 2, 4)[token_query, token_slot].reshape(-1, heads * dim)
        hidden = hidden + F.linear(attended, block.out)
        if block.out_bias is not None:
            hidden = hidden + block.out_bias
        hidden = mlp_forward(block, hidden * _rms(hidden, block.eps), hidden, weight_major=False)[0]
    return layers


def llama_block(block: nn.Module, x, prefix_keys, prefix_values, bias, cos, sin, heads: int, kv_heads: int):
    """Reference for `_BlockFunction`: the same block in plain differentiable operations, in the
    model's own dimension order (cos, sin (R, T, D) as the model's rotary embedding returns them;
    `bias` (R, 1, T, P + T) additive)."""
    rows, length, _ = x.shape
    attn, mlp = block.self_attn, block.mlp
    dim = prefix_keys.shape[-1]
    def norm(t, module):  # the model's RMSNorm, in the input's precision
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + module.variance_epsilon) * module.weight

    normed = norm(x, block.input_layernorm)
    query = attn.q_proj(normed).view(rows, length, heads, dim).transpose(1, 2)
    key = attn.k_proj(normed).view(rows, length, kv_heads, dim).transpose(1, 2)
    value = attn.v_proj(normed).view(rows, length, kv_heads, dim).transpose(1, 2)

    def rotate(t):
        half = t.shape[-1] // 2
        return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin[:, None]

    query, key = rotate(query), rotate(key)
    keys = torch.cat([prefix_keys, key], dim=-2).repeat_interleave(heads // kv_heads, dim=1)
    values = torch.cat([prefix_values, value], dim=-2).repeat_interleave(heads // kv_heads, dim=1)
    probs = torch.softmax(query @ keys.transpose(-1, -2) * attn.scaling + bias, dim=-1)
    hidden = x + attn.o_proj((probs @ values).transpose(1, 2).reshape(rows, length, -1))
    return hidden + mlp(norm(hidden, block.post_attention_layernorm))
