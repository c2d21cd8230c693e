"""The model layer: loading, per-architecture layout, hooks, forward passes shared by editing and
scoring (cached prompt prefixes, the blocks above an edited layer), and tokenization."""
