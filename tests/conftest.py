"""Shared test set-up: offline, deterministic, quiet."""

import os

# No test may reach the network or a wandb server; datasets/hub read these at import time.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from helpers import CONF  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture
def hf_cache_in_tmp(tmp_path, monkeypatch):
    """datasets' cache under the test's tmp_path: no test reads another's Arrow files."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One token cache for every run of a test session (per xdist worker)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def compose_train(tmp_path):
    """compose_train(*overrides): train.py's composed config, Hydra's node included (so
    ${hydra:...} resolves), writing to this test's tmp_path; Hydra's global state is cleared after."""
    def compose_train(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    yield compose_train
    HydraConfig.instance().cfg = None


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on one)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in keywords`: a parameter id "gpu" is one too
            item.add_marker(skip)
