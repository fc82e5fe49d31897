"""Tables of results: finished runs (their metrics.json), failed sweep trials (failed.json), and
scored checkpoints (lethe.evaluation), as markdown for the terminal and CSV/JSON for files.

A column is (header, value of a row, format): the markdown table shows the formatted value, the
CSV the value itself (numbers a CSV reader reads as numbers; empty where there is none).
"""

import csv
import json
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from lethe.errors import LetheError
from lethe.files import atomic_write, write_text


def millions(value) -> str:
    return f"{value / 1e6:.2f}M"


RUN_COLUMNS = [
    ("run", lambda m: Path(m["run_dir"]).name, str),  # unique within a sweep, unlike the model name
    ("model", lambda m: m["model"], str),
    ("params", lambda m: m["num_params"], millions),
    ("lr", lambda m: m.get("lr"), ".2g"),
    ("steps", lambda m: m["steps"], "d"),
    ("tokens", lambda m: m.get("tokens_seen") or 0, millions),
    ("train s", lambda m: m.get("train_time_s") or 0, ".0f"),
    ("val loss", lambda m: m.get("val_loss"), ".4f"),
    ("val ppl", lambda m: m.get("val_ppl"), ".3f"),
    ("val acc", lambda m: m.get("val_acc"), ".3f"),
    ("test loss", lambda m: m.get("test_loss"), ".4f"),
    ("test ppl", lambda m: m.get("test_ppl"), ".3f"),
]


def _cell(value, fmt) -> str:
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else format(value, fmt)


def markdown(rows: list[dict], columns) -> str:
    header = "| " + " | ".join(name for name, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = ("| " + " | ".join(_cell(value(r), fmt) for _, value, fmt in columns) + " |" for r in rows)
    return "\n".join([header, rule, *lines])


def write_tables(rows: list[dict], columns, out_dir: Path, name: str, json_rows: list[dict] | None = None) -> list[Path]:
    """<name>.json (the full rows, or `json_rows`) and <name>.csv (the table's columns,
    unformatted) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    write_text(json_path, json.dumps(rows if json_rows is None else json_rows, indent=2, default=str) + "\n")
    with atomic_write(csv_path, "w") as f:
        writer = csv.writer(f)
        writer.writerow([header for header, _, _ in columns])
        writer.writerows([["" if (v := value(r)) is None else v for _, value, _ in columns] for r in rows])
    return [json_path, csv_path]


# ---- runs and sweeps --------------------------------------------------------------------------
def run_files(root, name: str) -> list[Path]:
    """Every `name` (metrics.json, failed.json) in a run directory below root: one that Hydra made
    (.hydra/) or train.py wrote a config.yaml into. A report's own JSON files are not runs."""
    return [p for p in sorted(Path(root).rglob(name)) if (p.parent / ".hydra").is_dir() or (p.parent / "config.yaml").is_file()]


def _with_config(record: dict, run_dir: Path) -> dict:
    config = run_dir / "config.yaml"
    record["run_dir"] = str(run_dir)
    record["lr"] = OmegaConf.select(OmegaConf.load(config), "optim.lr") if config.is_file() else None
    return record


def find_runs(root, allow_empty: bool = False) -> list[dict]:
    root = Path(root)
    if not root.exists():
        raise LetheError(f"{root} does not exist; pass a run or sweep directory (e.g. logs/compare/<time>)")
    runs = [_with_config(json.loads(p.read_text()), p.parent) for p in run_files(root, "metrics.json")]
    if not runs and not allow_empty:
        raise LetheError(f"no metrics.json under {root}; a run writes it when training finishes")
    return runs


def find_failed(root) -> list[dict]:
    """Sweep trials that stopped with an error (train.py writes failed.json for them)."""
    return [_with_config(json.loads(p.read_text()), p.parent) for p in run_files(root, "failed.json")]


def markdown_table(runs: list[dict]) -> str:
    fingerprints = {m.get("corpus_fingerprint") for m in runs}
    note = ("" if len(fingerprints) == 1 else
            "\nwarning: these runs used different corpora (fingerprints differ); their numbers do not compare.")
    return markdown(runs, RUN_COLUMNS) + note


FAILED_COLUMNS = [
    ("failed run", lambda m: Path(m["run_dir"]).name, str),
    ("overrides", lambda m: " ".join(m.get("overrides", [])), str),
    ("error", lambda m: m["error"][:160], str),
]


def best_per_size(runs: list[dict]) -> list[dict]:
    """For each architecture (model family and config), the run with the lowest validation loss:
    the best learning rate of a sweep, as in the paper's scaling plots."""
    best = {}
    for m in runs:
        if m.get("val_loss") is None:
            continue
        key = (m["model"], m["num_params"], json.dumps(m.get("model_config"), sort_keys=True))
        if key not in best or m["val_loss"] < best[key]["val_loss"]:
            best[key] = m
    return [best[k] for k in sorted(best)]


# ---- scored checkpoints ---------------------------------------------------------------------
def label_checkpoints(rows: list[dict]) -> None:
    """Each row's `label`, unique among the rows: its run name, with the run's directory (or the
    checkpoint's path) after it where two rows share a name (one model trained twice, say)."""
    counts = Counter(r["run"] for r in rows)
    for r in rows:
        ckpt = Path(r["ckpt"])
        where = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else str(ckpt)
        r["label"] = r["run"] if counts[r["run"]] == 1 else f"{r['run']} [{where}]"
    if len({r["label"] for r in rows}) < len(rows):  # same run directory name in two places: the full path
        for r in rows:
            r["label"] = f"{r['run']} [{r['ckpt']}]" if counts[r["run"]] > 1 else r["label"]


EVAL_FAILED_COLUMNS = [("checkpoint", lambda r: r["ckpt"], str), ("error", lambda r: r["error"][:200], str)]


def eval_columns(rows: list[dict]) -> list:
    splits = [s for s in ("train", "val", "test") if any(s in r for r in rows)]
    synthetic = all(r["synthetic"] for r in rows)
    per_length = "acc" if synthetic else "ppl"
    second = "acc" if synthetic else "bpb"
    columns = [("run", lambda r: r.get("label", r["run"]), str), ("model", lambda r: r["model"], str),
               ("tokenizer", lambda r: r.get("tokenizer"), str), ("params", lambda r: r["params"], ",d"),
               ("tokens trained", lambda r: r["tokens_trained"], millions),
               ("train tok/s", lambda r: r.get("train_tokens_per_s"), ",.0f"),
               ("state MB", lambda r: r.get("state_mb"), ".3f")]
    if not synthetic:  # how packed documents were scored: each alone (reset) or with its neighbours' context
        columns.insert(3, ("documents", lambda r: {False: "reset", True: "cross"}.get(r.get("cross_document")), str))
    for split in splits:
        columns.append((f"{split} ppl", lambda r, s=split: r.get(s, {}).get("ppl"), ".3f"))
        columns.append((f"{split} {second}", lambda r, s=split: r.get(s, {}).get(second), ".4f"))
        columns.append((f"{split} tokens", lambda r, s=split: r.get(s, {}).get("tokens"), ",d"))
    for length in sorted({e["length"] for r in rows for e in r["lengths"]}):
        columns.append((f"{per_length}@{length}",
                        lambda r, n=length: next((e[per_length] for e in r["lengths"] if e["length"] == n), None), ".3f"))
    for task, metric in task_metrics(rows):  # zero-shot tasks (eval.py tasks=...): each metric and its stderr
        for key in (metric, f"{metric}_stderr"):
            columns.append((f"{task} {key.replace('_stderr', ' ±')}",
                            lambda r, t=task, k=key: (r.get("tasks") or {}).get(t, {}).get(k), ".4f"))
    return columns


def task_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs the rows' harness results hold, stderrs aside, in a stable order."""
    pairs = {(task, metric) for r in rows for task, metrics in (r.get("tasks") or {}).items() for metric in metrics
             if not metric.endswith("_stderr")}
    return sorted(pairs)


CHECKPOINT_COLUMN = ("checkpoint", lambda r: r["ckpt"], str)  # in the CSV: the terminal table stays narrow
