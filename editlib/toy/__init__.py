"""The toy fact world: a seeded fictional knowledge base, its datasets, and the tiny Llama trained on
it (the laptop-CPU default of the workflow)."""
