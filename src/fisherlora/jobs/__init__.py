"""The `fisherlora init` jobs, one module per task type (`seq_cls`, `causal_lm`) plus what they share (`common`)."""
