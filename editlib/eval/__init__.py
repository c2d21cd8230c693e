"""Evaluation of a (possibly edited) model: CounterFact/ZsRE edit metrics, generation entropy, causal
tracing, known-fact filters, and downstream tasks through lm-evaluation-harness."""
