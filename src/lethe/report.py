"""Collect finished runs (their metrics.json) into one table."""

import json
from pathlib import Path

from lethe.errors import LetheError

COLUMNS = [
    ("run", lambda m: Path(m["run_dir"]).name),  # unique within a sweep, unlike the model name
    ("model", lambda m: m["model"]),
    ("params", lambda m: f"{m['num_params'] / 1e6:.2f}M"),
    ("steps", lambda m: str(m["steps"])),
    ("tokens", lambda m: f"{(m.get('tokens_seen') or 0) / 1e6:.2f}M"),
    ("train s", lambda m: f"{m.get('train_time_s') or 0:.0f}"),
    ("val loss", lambda m: _num(m.get("val_loss"), ".4f")),
    ("val ppl", lambda m: _num(m.get("val_ppl"), ".3f")),
    ("test loss", lambda m: _num(m.get("test_loss"), ".4f")),
    ("test ppl", lambda m: _num(m.get("test_ppl"), ".3f")),
]


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def find_runs(root) -> list[dict]:
    root = Path(root)
    if not root.exists():
        raise LetheError(f"runs={root} does not exist; pass a run or sweep directory (e.g. logs/compare/<time>)")
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        metrics["run_dir"] = str(path.parent)
        runs.append(metrics)
    if not runs:
        raise LetheError(f"no metrics.json under {root}; a run writes it when training finishes")
    return runs


def markdown_table(runs: list[dict]) -> str:
    fingerprints = {m.get("corpus_fingerprint") for m in runs}
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(m) for _, cell in COLUMNS) + " |" for m in runs]
    note = "" if len(fingerprints) == 1 else "\nwarning: these runs used different corpora (fingerprints differ); their numbers do not compare."
    return "\n".join([header, rule, *rows]) + note
