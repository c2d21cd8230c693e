"""Device memory of the statistics job, and how many layers one pass over the corpus may collect.

Torch-free arithmetic: the statistics job calls it with the loaded model's numbers and the
device's free memory; a resource plan can call it with a hub model's config.json fields
(editlib.model.architectures) before anything is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}

# Fraction of the available memory the plan may fill; the rest absorbs allocator fragmentation,
# the CUDA context's growth and activation terms this estimate leaves out.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class StatisticsMemory:
    """The peak-memory terms of one statistics pass, in bytes, and the layers per pass."""

    model_bytes: int  # the model's weights on the device
    gram_bytes: int  # one layer's accumulator, d_k x d_k in the accumulation dtype
    capture_bytes: int  # one layer's captured input of one batch (masked copy + accumulation-dtype copy)
    activation_bytes: int  # the forward's own activations for one batch (estimate)
    group_size: int  # layers collected per pass over the corpus
    n_layers: int  # layers requested

    @property
    def passes(self) -> int:
        """Passes over the corpus: ceil(n_layers / group_size)."""
        return -(-self.n_layers // self.group_size) if self.n_layers else 0

    @property
    def peak_bytes(self) -> int:
        """model + group_size x gram + capture + activations."""
        return self.model_bytes + self.group_size * self.gram_bytes + self.capture_bytes + self.activation_bytes


def statistics_memory(*, intermediate_size: int, hidden_size: int, n_layers: int, batch_tokens: int,
                      model_bytes: int, model_dtype: str = "float32", acc_dtype: str = "float32",
                      available_bytes: int | None = None, layers_per_pass: int | None = None) -> StatisticsMemory:
    """The statistics job's peak device memory and the number of layers each pass collects.

    With d_k = `intermediate_size` (the edited down-projection's input width), d = `hidden_size`,
    T = `batch_tokens`, m = bytes per element of `model_dtype` and a = of `acc_dtype`:

        gram_bytes       = d_k^2 * a                       (one layer's accumulator)
        capture_bytes    = T * d_k * (m + a)               (m only when the dtypes are equal)
        activation_bytes = T * (4 * d_k + 8 * d) * m       (MLP intermediates, attention, residual)
        peak_bytes       = model_bytes + group_size * gram_bytes + capture_bytes + activation_bytes

    Each layer's Gram matrix is accumulated inside its hook as the forward passes through the
    layer, so one layer's captured input is alive at a time whatever the group size.
    `activation_bytes` assumes attention that does not materialise the (T x T) score matrix
    (sdpa / flash); eager attention needs rows x heads x max_length^2 x m more.

    group_size: `layers_per_pass` when given (at most `n_layers`); else, with `available_bytes`
    (all device memory the job may use, the model included), the most layers whose accumulators
    fit in USABLE_FRACTION of it beside the other terms:

        group_size = floor((0.9 * available_bytes - model_bytes - capture_bytes - activation_bytes) / gram_bytes)

    clamped to [1, n_layers]; without either, all `n_layers` in one pass (the CPU default).
    A group_size of 1 whose peak_bytes still exceeds available_bytes does not fit at all.
    """
    for name, dtype in (("model_dtype", model_dtype), ("acc_dtype", acc_dtype)):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{name} {dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    if layers_per_pass is not None and layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
    m, a = DTYPE_BYTES[model_dtype], DTYPE_BYTES[acc_dtype]
    d_k, tokens = intermediate_size, batch_tokens
    gram = d_k * d_k * a
    capture = tokens * d_k * (m + (a if acc_dtype != model_dtype else 0))
    activations = tokens * (4 * d_k + 8 * hidden_size) * m
    n = max(n_layers, 0)
    if layers_per_pass is not None:
        group = min(layers_per_pass, n)
    elif available_bytes is not None:
        room = int(USABLE_FRACTION * available_bytes) - model_bytes - capture - activations
        group = min(max(room // gram, 1), n)
    else:
        group = n
    return StatisticsMemory(model_bytes=model_bytes, gram_bytes=gram, capture_bytes=capture,
                            activation_bytes=activations, group_size=max(group, 1) if n else 0, n_layers=n)
