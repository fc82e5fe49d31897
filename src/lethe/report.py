"""Tables of results: finished runs (their metrics.json), failed sweep trials (failed.json), and
scored checkpoints (lethe.evaluation), as markdown for the terminal and CSV/JSON for files."""

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from lethe.errors import LetheError
from lethe.files import atomic_write, write_text


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def _millions(value):
    return "-" if value is None else f"{value / 1e6:.2f}M"


RUN_COLUMNS = [
    ("run", lambda m: Path(m["run_dir"]).name),  # unique within a sweep, unlike the model name
    ("model", lambda m: m["model"]),
    ("params", lambda m: _millions(m["num_params"])),
    ("lr", lambda m: _num(m.get("lr"), ".2g")),
    ("steps", lambda m: str(m["steps"])),
    ("tokens", lambda m: _millions(m.get("tokens_seen") or 0)),
    ("train s", lambda m: f"{m.get('train_time_s') or 0:.0f}"),
    ("val loss", lambda m: _num(m.get("val_loss"), ".4f")),
    ("val ppl", lambda m: _num(m.get("val_ppl"), ".3f")),
    ("val acc", lambda m: _num(m.get("val_acc"), ".3f")),
    ("test loss", lambda m: _num(m.get("test_loss"), ".4f")),
    ("test ppl", lambda m: _num(m.get("test_ppl"), ".3f")),
]


def markdown(rows: list[dict], columns) -> str:
    """columns: [(header, row -> cell text)]."""
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([header, rule, *("| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows)])


def write_tables(rows: list[dict], columns, out_dir: Path, name: str) -> list[Path]:
    """<name>.json (the full rows) and <name>.csv (the table's columns) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    write_text(json_path, json.dumps(rows, indent=2, default=str) + "\n")
    with atomic_write(csv_path, "w") as f:
        writer = csv.writer(f)
        writer.writerow([header for header, _ in columns])
        writer.writerows([[cell(r) for _, cell in columns] for r in rows])
    return [json_path, csv_path]


# ---- runs and sweeps --------------------------------------------------------------------------
def _with_config(record: dict, run_dir: Path) -> dict:
    config = run_dir / "config.yaml"
    record["run_dir"] = str(run_dir)
    record["lr"] = OmegaConf.select(OmegaConf.load(config), "optim.lr") if config.is_file() else None
    return record


def find_runs(root, allow_empty: bool = False) -> list[dict]:
    root = Path(root)
    if not root.exists():
        raise LetheError(f"{root} does not exist; pass a run or sweep directory (e.g. logs/compare/<time>)")
    runs = [_with_config(json.loads(p.read_text()), p.parent) for p in sorted(root.rglob("metrics.json"))]
    if not runs and not allow_empty:
        raise LetheError(f"no metrics.json under {root}; a run writes it when training finishes")
    return runs


def find_failed(root) -> list[dict]:
    """Sweep trials that stopped with an error (train.py writes failed.json for them)."""
    return [_with_config(json.loads(p.read_text()), p.parent) for p in sorted(Path(root).rglob("failed.json"))]


def markdown_table(runs: list[dict]) -> str:
    fingerprints = {m.get("corpus_fingerprint") for m in runs}
    note = ("" if len(fingerprints) == 1 else
            "\nwarning: these runs used different corpora (fingerprints differ); their numbers do not compare.")
    return markdown(runs, RUN_COLUMNS) + note


FAILED_COLUMNS = [
    ("failed run", lambda m: Path(m["run_dir"]).name),
    ("overrides", lambda m: " ".join(m.get("overrides", []))),
    ("error", lambda m: m["error"][:160]),
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
def eval_columns(rows: list[dict]) -> list:
    splits = [s for s in ("train", "val", "test") if any(s in r for r in rows)]
    synthetic = all(r["synthetic"] for r in rows)
    per_length = "acc" if synthetic else "ppl"
    columns = [("run", lambda r: r["run"]), ("model", lambda r: r["model"]), ("params", lambda r: f"{r['params']:,}"),
               ("tokens trained", lambda r: _millions(r["tokens_trained"]))]
    for split in splits:
        columns.append((f"{split} ppl", lambda r, s=split: _num(r.get(s, {}).get("ppl"), ".3f")))
        columns.append((f"{split} acc" if synthetic else f"{split} bpb",
                        lambda r, s=split, k="acc" if synthetic else "bpb": _num(r.get(s, {}).get(k), ".4f")))
        columns.append((f"{split} tokens", lambda r, s=split: _num(r.get(s, {}).get("tokens"), ",d")))
    lengths = sorted({e["length"] for r in rows for e in r["lengths"]})
    for length in lengths:
        columns.append((f"{per_length}@{length}", lambda r, n=length: _num(next(
            (e[per_length] for e in r["lengths"] if e["length"] == n), None), ".3f")))
    return columns
