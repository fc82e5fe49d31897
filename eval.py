"""Score checkpoints, sweep context lengths, and report sweeps.

    python eval.py ckpt=<run>/checkpoints/best.ckpt          # one checkpoint
    python eval.py ckpt=logs/compare/<time>                    # every run below a directory
    python eval.py 'ckpt=[a.ckpt,b.ckpt]' lengths='[1,4,16]' max_tokens=65536
    python eval.py ckpt=imported.ckpt data=local data.source.path='corpus/*.txt' seq_len=1024
    python eval.py ckpt=<run> tasks=paper limit=500              # + zero-shot tasks (lm-evaluation-harness)
    python eval.py sweep=logs/sweep/multiruns/<time>           # one table + plots of a sweep

Writes a markdown table to stdout and JSON, CSV and PNG plots to the eval directory
(logs/eval/<time>/, or out_dir=...).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lethe import cli  # noqa: F401 (also registers the resolver --help uses)

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("LETHE_ROOT", str(ROOT))


def report_checkpoints(cfg: DictConfig, out_dir: Path) -> tuple[list[Path], int]:
    """Score every checkpoint; returns the files written and how many checkpoints failed."""
    from lethe.evaluation import evaluate_checkpoints
    from lethe.plots import plot_lengths, plot_tasks, plot_val_curves
    from lethe.report import CHECKPOINT_COLUMN, EVAL_FAILED_COLUMNS, eval_columns, label_checkpoints, markdown, write_tables
    from lethe.training.resume import run_dir_of

    rows, failed = evaluate_checkpoints(cfg)
    written = []
    if rows:
        label_checkpoints(rows)
        columns = eval_columns(rows)
        print(markdown(rows, columns))
        if not cfg.get("data"):
            for r in rows:
                if r["fingerprint_matches_run"] is False:
                    print(f"warning: {r['label']}: the data's fingerprint differs from the one it was trained on", file=sys.stderr)
        # eval.json: the scored rows, then the checkpoints that failed with their errors
        written = write_tables(rows, [*columns, CHECKPOINT_COLUMN], out_dir, "eval", json_rows=rows + failed)
        written.append(plot_lengths(rows, out_dir / "ppl_vs_length.png"))
        written.append(plot_tasks(rows, out_dir / "tasks.png"))
        runs = {r["label"]: run_dir_of(r["ckpt"]) for r in rows}
        written.append(plot_val_curves({k: v for k, v in runs.items() if v}, out_dir / "val_curves.png"))
    else:
        written = write_tables(failed, EVAL_FAILED_COLUMNS, out_dir, "eval")
    if failed:
        print(f"\n{len(failed)} of {len(rows) + len(failed)} checkpoints could not be scored:\n{markdown(failed, EVAL_FAILED_COLUMNS)}")
    return written, len(failed)


def report_sweep(cfg: DictConfig, out_dir: Path) -> tuple[list[Path], int]:
    """Table and plots of a sweep's runs, failed trials included; returns the files written (and 0:
    a failed trial is a result of the sweep, not a failure of the report)."""
    from lethe.plots import plot_sweep, plot_val_curves
    from lethe.report import FAILED_COLUMNS, RUN_COLUMNS, best_per_size, find_failed, find_runs, markdown, markdown_table, write_tables

    failed = find_failed(cfg.sweep)
    runs = find_runs(cfg.sweep, allow_empty=bool(failed))
    print(markdown_table(runs) if runs else "no finished run")
    if failed:
        print(f"\n{len(failed)} failed:\n{markdown(failed, FAILED_COLUMNS)}")
    best = best_per_size(runs)
    if len(best) < len(runs):
        print(f"\nbest learning rate per size:\n{markdown(best, RUN_COLUMNS)}")
    written = write_tables(runs, RUN_COLUMNS, out_dir, "sweep") + write_tables(failed, FAILED_COLUMNS, out_dir, "failed")
    written.append(plot_sweep(runs, out_dir / "sweep.png"))
    written.append(plot_val_curves({Path(m["run_dir"]).name: m["run_dir"] for m in runs}, out_dir / "val_curves.png"))
    return written, 0


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from lethe.errors import LetheError

    with cli.user_errors():
        if bool(cfg.ckpt) == bool(cfg.sweep):
            raise LetheError("pass one of ckpt=<file.ckpt | run or sweep directory | [list]> (score checkpoints) "
                             "or sweep=<directory> (tabulate a sweep's runs)")
        out_dir = Path(cfg.out_dir or cfg.paths.output_dir)
        written, failed = (report_checkpoints if cfg.ckpt else report_sweep)(cfg, out_dir)
        print("\nwrote " + "  ".join(str(p) for p in written if p), flush=True)
        if failed:
            raise LetheError(f"{failed} checkpoint(s) could not be scored (their errors are above and in {out_dir / 'eval.json'})")


if __name__ == "__main__":
    main()
