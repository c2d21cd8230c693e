"""editlib: locate-and-edit model editing (ROME, r-ROME, MEMIT, EMMET, AlphaEdit) and GRACE,
with CounterFact/ZsRE metrics, for the scaling-model-editing workflow."""

__version__ = "0.1.0"
