"""What every other layer stands on: the artifact store, typed records, hashing, settings-free helpers.

Nothing in `core` imports from another quant_pipeline package."""
