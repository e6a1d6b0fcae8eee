"""The Dagster layer: one module per asset group, thin wrappers around the pure functions below."""
