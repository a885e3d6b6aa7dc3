"""Data readers of the `fisherlora init` jobs: user files in, calibration batches out.

- `records`: CSV / JSON Lines files as records that keep their line numbers (also the benchmark's
  csv task reader).
- `causal_lm`: prompt/completion or chat `messages` records -> token ids with completion-only labels.
"""
