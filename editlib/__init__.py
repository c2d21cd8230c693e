"""editlib: locate-and-edit model editing (ROME, r-ROME, MEMIT, EMMET, AlphaEdit) and GRACE,
with CounterFact/ZsRE metrics, for the scaling-model-editing workflow."""

__version__ = "0.1.0"

# The notebook API (editlib/api.py, README "Python API"), imported on first use so that
# `import editlib` and the torch-free subpackages (config checks, planning) do not load torch.
_API = ("Request", "load_model", "second_moments", "open_editor", "load_edit", "evaluate", "Session",
        "MissingStatisticsError")


def __getattr__(name: str):
    if name in _API:
        from editlib import api

        return getattr(api, name)
    raise AttributeError(f"module 'editlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
