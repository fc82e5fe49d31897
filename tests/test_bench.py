"""The benchmarks run end to end at toy sizes (their figures are in bench/results/, not asserted here)."""

import pytest

from helpers import run_script


@pytest.mark.slow
def test_scan_benchmark_prints_every_impl():
    out = run_script("bench/scan.py", "--shapes", "1,4,33,4", "--rounds", "1", "--repeats", "1").stdout
    rows = [line for line in out.splitlines() if line.startswith("| (1, 4, 33, 4)")]
    assert [row.split("|")[2].strip() for row in rows] == ["reference", "chunked", "cpu"]
    assert all(float(row.split("|")[4].split()[0]) > 0 for row in rows)  # forward+backward ms (median)


@pytest.mark.slow
def test_generation_benchmark_prints_both_models():
    out = run_script("bench/generate.py", "--batches", "1", "--prompts", "8", "--new-tokens", "4", "--repeats", "1").stdout
    rows = [line for line in out.splitlines() if line.startswith("| mamba-tiny") or line.startswith("| transformer-tiny")]
    assert len(rows) == 2 and all(float(row.split("|")[6]) > 0 for row in rows)  # decode tok/s
