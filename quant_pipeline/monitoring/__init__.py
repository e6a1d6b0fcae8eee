"""Live monitoring of served models: per-window signals, prompt drift, the canary rollback policy, dashboards.

The audit judges a model on the golden suite before release; what it cannot see is the traffic a released
model meets afterwards. This package turns the request log (one JSON line per served request) into the
numbers that say whether a canary behaves like production, whether the prompts still look like the ones the
audit measured, and whether the canary must be taken off traffic. Pure functions over typed records; the
Dagster layer (`defs/monitoring.py`) runs them per model and hour, and `release/canary.py` moves the alias.
"""
