"""Score checkpoints and compare runs.

    python eval.py ckpt=logs/train/runs/<run>/checkpoints/best.ckpt [split=val]
    python eval.py ckpt=imported.ckpt data=local data.source.path='corpus/*.txt' seq_len=1024
    python eval.py runs=logs/compare/<time>         # a table of every run below the directory
"""

import os
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("LETHE_ROOT", str(ROOT))


def score_checkpoint(cfg: DictConfig) -> dict:
    import torch
    from tqdm import tqdm

    from lethe.config import instantiate
    from lethe.errors import ConfigError
    from lethe.training.checkpoint import load_trained_model
    from lethe.training.module import perplexity, summed_nll

    model, tokenizer, meta = load_trained_model(cfg.ckpt)
    # Data and block length from the command line, else the training run's own. An imported
    # checkpoint (python -m lethe.interop import) has no run, so both must be named.
    run = meta["run_config"] or {}
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else run.get("data")
    seq_len = cfg.seq_len or run.get("seq_len")
    if data is None or seq_len is None:
        missing = " and ".join(key for key, value in (("data", data), ("seq_len", seq_len)) if value is None)
        raise ConfigError(f"checkpoint {cfg.ckpt} has no training run to take the {missing} from; name them, "
                          "e.g. data=local data.source.path='corpus/*.txt' seq_len=1024")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split={cfg.split!r}; choose train, val or test")
    if cfg.batch_size < 1 or (cfg.max_batches is not None and cfg.max_batches < 1):
        raise ConfigError(f"batch_size={cfg.batch_size} and max_batches={cfg.max_batches} must be >= 1 (max_batches may be null)")
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        # The checkpoint's own tokenizer, loaded from its files: eval never re-trains or downloads one.
        tokenizer.save_pretrained(tokenizer_dir)
        datamodule = instantiate(
            {**data, "eval_batch_size": cfg.batch_size},
            tokenizer={"kind": "pretrained", "name": tokenizer_dir},
            seq_len=seq_len,
            cache_dir=cfg.paths.data_dir,
            _recursive_=False,
        )
        datamodule.setup()
    if not cfg.get("data") and datamodule.fingerprint != meta["corpus_fingerprint"]:
        print(f"warning: corpus fingerprint {datamodule.fingerprint} differs from the run's {meta['corpus_fingerprint']}", file=sys.stderr)
    loader = datamodule.eval_dataloader(cfg.split)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(tqdm(loader, desc=f"scoring {cfg.split}", unit="batch")):
            if cfg.max_batches is not None and i >= cfg.max_batches:
                break
            nll, tokens = summed_nll(model, batch)
            total_nll += nll.item()
            total_tokens += int(tokens)
    loss = total_nll / total_tokens
    return {"ckpt": str(cfg.ckpt), "split": cfg.split, "num_params": meta["num_params"], "tokens": total_tokens,
            "loss": loss, "ppl": perplexity(loss)}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from lethe.errors import LetheError
    from lethe.report import find_runs, markdown_table

    try:
        if cfg.runs:
            print(markdown_table(find_runs(cfg.runs)))
        elif cfg.ckpt:
            r = score_checkpoint(cfg)
            print(f"{r['ckpt']}\n{r['split']}: loss {r['loss']:.4f}  perplexity {r['ppl']:.3f}  "
                  f"({r['tokens']:,} tokens, {r['num_params']:,} parameters)")
        else:
            raise LetheError("nothing to evaluate: pass ckpt=<file.ckpt> or runs=<run or sweep directory>")
    except LetheError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
