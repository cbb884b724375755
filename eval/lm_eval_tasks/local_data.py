"""Load a shipped task's JSONL files relative to this folder, so the tasks run from any working directory and
offline. (A task of your own can use lm-eval's plain `dataset_path: json` with `data_files` instead.)"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load_jsonl(data_files: dict, **_metadata) -> datasets.DatasetDict:
    splits = {}
    for split, name in data_files.items():
        path = HERE / name
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
