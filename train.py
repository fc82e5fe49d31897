"""Train a Mamba language model or its Transformer++ baseline.

    python train.py                                  # mamba-tiny on the embedded corpus
    python train.py model=transformer-tiny optim.lr=1e-3
    python train.py -m optim.lr=1e-3,3e-3 model=mamba-tiny,transformer-tiny
    python train.py --help | --cfg job
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("LETHE_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lethe.errors import LetheError
    from lethe.training.run import train

    try:
        metrics = train(cfg)
    except LetheError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    return metrics.get("val_loss")  # the objective for Hydra sweepers


if __name__ == "__main__":
    main()
