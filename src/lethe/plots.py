"""PNG plots for eval.py: perplexity (or task accuracy) against context length, validation
curves read from the runs' CSV logs, and a sweep's validation perplexity against learning rate
and (best learning rate) against model size."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from lethe.metrics import perplexity  # noqa: E402
from lethe.report import best_per_size  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lengths(rows: list[dict], path: Path) -> Path | None:
    """One line per checkpoint: the length-sweep metric against evaluation length (log2 axis);
    a marker shows each checkpoint's training length."""
    rows = [r for r in rows if r["lengths"]]
    if not rows:
        return None
    metric = "acc" if all(r["synthetic"] for r in rows) else "ppl"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        lengths = [e["length"] for e in r["lengths"]]
        (line,) = ax.plot(lengths, [e[metric] for e in r["lengths"]], marker="o", label=f"{r.get('label', r['run'])} ({r['model']})")
        ax.axvline(r["train_seq_len"], color=line.get_color(), linestyle=":", alpha=0.6)
    ax.set_xscale("log", base=2)
    if metric == "ppl":
        ax.set_yscale("log")
    ax.set_xlabel("evaluation context length (tokens; dotted: training length)")
    ax.set_ylabel("answer accuracy" if metric == "acc" else "perplexity")
    ax.set_title("accuracy vs context length" if metric == "acc" else "perplexity vs context length")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tasks(rows: list[dict], path: Path) -> Path | None:
    """Zero-shot task scores (accuracies) side by side: a group of bars per task metric, one bar
    per checkpoint, with the harness's standard errors."""
    from lethe.report import task_metrics

    pairs = [(t, m) for t, m in task_metrics(rows) if m.startswith("acc")]
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(pairs) + 2), 4.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        scores = [(r.get("tasks") or {}).get(t, {}) for t, _ in pairs]
        ax.bar([k + i * width for k in range(len(pairs))], [s.get(m, 0) for s, (_, m) in zip(scores, pairs)], width,
               yerr=[s.get(f"{m}_stderr", 0) for s, (_, m) in zip(scores, pairs)], capsize=2,
               label=f"{r.get('label', r['run'])} ({r['model']})")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(pairs))], [f"{t}\n{m}" for t, m in pairs], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title("zero-shot tasks (lm-evaluation-harness)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def read_val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val loss) from a run's csv/metrics.csv; [] when the run logged no CSV."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]


def plot_val_curves(runs: dict, path: Path) -> Path | None:
    """runs: {label: run directory}. Validation perplexity against optimizer step."""
    curves = {label: read_val_curve(d) for label, d in runs.items()}
    curves = {label: c for label, c in curves.items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        ax.plot([s for s, _ in curve], [perplexity(v) for _, v in curve], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity")
    ax.set_title("validation curves")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(runs: list[dict], path: Path) -> Path | None:
    """Left: validation perplexity against learning rate, one line per (family, size). Right:
    the best learning rate's perplexity against parameters, one line per family."""
    runs = [m for m in runs if m.get("val_ppl") is not None and m.get("lr")]
    if not runs:
        return None
    fig, (by_lr, by_size) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key in sorted({(m["model"], m["num_params"]) for m in runs}):
        points = sorted((m["lr"], m["val_ppl"]) for m in runs if (m["model"], m["num_params"]) == key)
        by_lr.plot(*zip(*points), marker="o", label=f"{key[0]} {key[1] / 1e6:.2f}M")
    by_lr.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="validation perplexity", title="val ppl vs lr")
    by_lr.legend(fontsize=8)
    best = best_per_size(runs)
    for family in sorted({m["model"] for m in best}):
        points = sorted((m["num_params"], m["val_ppl"]) for m in best if m["model"] == family)
        by_size.plot(*zip(*points), marker="o", label=family)
    by_size.set(xscale="log", yscale="log", xlabel="parameters", ylabel="validation perplexity (best lr)",
                title="best-of-lr per size")
    by_size.legend(fontsize=8)
    return _save(fig, path)
