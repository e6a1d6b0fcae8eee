"""Measuring a checkpoint: the lm-eval adapter, greedy generation, behaviour scorers, agreement,
policies and per-slice deltas with their intervals."""
