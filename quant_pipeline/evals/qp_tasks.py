"""Dataset loaders for the shipped lm-eval tasks (referenced from the YAML files as `!function`).

The data lives beside these files, inside the package, so evaluation never touches a hub.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load_golden(category: str, file: str = "golden_v1.jsonl", **_) -> datasets.DatasetDict:
    ds = datasets.load_dataset("json", data_files={"test": str(HERE / file)})["test"]
    return datasets.DatasetDict({"test": ds.filter(lambda d: d["category"] == category)})


def load_heldout(file: str = "heldout.jsonl", **_) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files={"test": str(HERE / file)})["test"]})
