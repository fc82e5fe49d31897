"""The benchmarks run end to end at toy sizes and their tables add up: ratios are the ratios of
the times they print, memory is what the architectures hold. (Their speed figures are in
bench/results/, measured, never asserted here.)"""

import pytest

from helpers import run_script

SSD_ROWS = ["lethe reference", "lethe chunked (chunk 256)", "lethe chunked (chunk 64)", "lethe cpu"]


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith(f"| {first_cell}")]


@pytest.mark.slow
def test_scan_benchmark_reports_every_impl_and_its_own_ratios():
    out = run_script("bench/scan.py", "--tables", "mamba", "--shapes", "1,16,400,8", "--rounds", "2", "--repeats", "1").stdout
    rows = {row[1]: row for row in table_rows(out, "(1, 16, 400, 8)")}
    assert list(rows) == ["reference", "chunked", "cpu", "chunked + documents", "cpu + documents"]
    median = {impl: (float(row[2].split()[0]), float(row[3].split()[0])) for impl, row in rows.items()}
    for impl, row in rows.items():
        forward, backward = (float(x.rstrip("x")) for x in row[6].split(" / "))  # "vs chunked": medians' ratio
        assert forward == pytest.approx(median["chunked"][0] / median[impl][0], rel=0.06, abs=0.06)
        assert backward == pytest.approx(median["chunked"][1] / median[impl][1], rel=0.06, abs=0.06)
    assert rows["chunked"][6] == "1.0x / 1.0x"
    # the reference's autograd keeps every step's state; the fused kernel keeps chunk boundaries only
    assert float(rows["cpu"][4]) < float(rows["reference"][4])
    for impl in ("chunked", "cpu"):  # the summary of what the resets cost is the ratio of the rows' medians
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{impl} at (1, 16, 400, 8)"))
        forward = float(line.split(": ")[1].split("x")[0])
        assert forward == pytest.approx(median[f"{impl} + documents"][0] / median[impl][0], rel=0.06, abs=0.06)  # times print to 0.01 ms


@pytest.mark.slow
def test_ssd_benchmark_compares_with_transformers_and_mamba1():
    out = run_script("bench/scan.py", "--tables", "mamba2", "--ssd-shapes", "1,2,8,16,300", "--rounds", "2", "--repeats", "1").stdout
    rows = {row[1]: row for row in table_rows(out, "(1, 2, 8, 16, 300)")}
    assert list(rows) == [*SSD_ROWS, "transformers torch", "mamba-1 cpu (d_state 16)"], out
    median = {impl: (float(row[2].split()[0]), float(row[3].split()[0])) for impl, row in rows.items()}
    for impl, row in rows.items():
        for column, base in ((6, "transformers torch"), (7, "mamba-1 cpu (d_state 16)")):
            ratios = (float(x.rstrip("x")) for x in row[column].split(" / "))
            for ratio, base_ms, ms in zip(ratios, median[base], median[impl]):
                if min(base_ms, ms) >= 1:  # printed to 0.01 ms: below 1 ms the rounding is over 1%
                    assert ratio == pytest.approx(base_ms / ms, rel=0.06, abs=0.02), (impl, base)
    assert rows["transformers torch"][6] == "1.00x / 1.00x"
    # the chunked SSD saves its inputs and the chunk-entering states, not autograd's (Q x Q) intermediates
    assert float(rows["lethe chunked (chunk 64)"][4]) < float(rows["transformers torch"][4])


@pytest.mark.slow
def test_attention_benchmark_compares_the_document_mask_with_causal():
    out = run_script("bench/attention.py", "--shapes", "2,128,64", "--rounds", "2", "--repeats", "1", "--document-length", "16").stdout
    rows = {row[1]: row for row in table_rows(out, "(2, 128, 64)")}
    assert list(rows) == ["causal", "sdpa + mask"] and rows["causal"][4] == "1.00x"
    ratio = float(rows["sdpa + mask"][5].rstrip("x"))
    assert ratio == pytest.approx(float(rows["sdpa + mask"][3]) / float(rows["causal"][3]), rel=0.02, abs=0.01)


@pytest.mark.slow
def test_generation_benchmark_reports_the_state_each_model_keeps():
    prompt, new = 160, 4  # past samba-tiny's window of 128
    out = run_script("bench/generate.py", "--batches", "1", "--prompts", str(prompt), "--new-tokens", str(new), "--repeats", "1").stdout
    (mamba,), (mamba2,), (hybrid,), (samba,), (transformer,) = (
        table_rows(out, name) for name in ("mamba-tiny", "mamba2-tiny", "hybrid-tiny", "samba-tiny", "transformer-tiny"))
    assert all(float(row[5]) > 0 for row in (mamba, mamba2, hybrid, samba, transformer))  # decode tok/s
    # mamba-tiny: 4 layers x (conv window 3 + SSM state 16) x d_inner 256 floats, whatever the length
    assert float(mamba[6]) == pytest.approx(4 * 256 * (3 + 16) * 4 / 2**20, abs=0.006)
    # mamba2-tiny: 4 layers x (conv window 3 x (d_inner 256 + B and C 2 x 64) + 8 heads x 32 x 64 state) floats
    assert float(mamba2[6]) == pytest.approx(4 * (3 * 384 + 8 * 32 * 64) * 4 / 2**20, abs=0.006)
    # transformer-tiny: 2 layers x (keys + values) x (prompt + new) positions x d_model 128 floats
    assert float(transformer[6]) == pytest.approx(2 * 2 * (prompt + new) * 128 * 4 / 2**20, abs=0.006)
    # hybrid-tiny: 3 Mamba-2 layers (conv window 3 x (256 + 2 x 128) + 8 heads x 32 x 128 state) + one layer's KV cache
    assert float(hybrid[6]) == pytest.approx((3 * (3 * 512 + 8 * 32 * 128) + 2 * (prompt + new) * 128) * 4 / 2**20, abs=0.006)
    # samba-tiny: one Mamba layer, and a KV cache of the window's 128 positions only (MLPs keep nothing)
    assert float(samba[6]) == pytest.approx((256 * (3 + 16) + 2 * 128 * 128) * 4 / 2**20, abs=0.006)


@pytest.mark.slow
def test_train_step_benchmark_reports_every_model_against_lethes_mamba():
    models = ["lethe-mamba", "lethe-mamba-chunked", "lethe-mamba2", "lethe-hybrid", "lethe-transformer", "hf-mambapy", "hf-sequential"]
    out = run_script("bench/train_step.py", "--shapes", "2,32", "--d-model", "64", "--layers", "2", "--vocab", "64", "--rounds", "2",
                     "--mamba2-state", "8", "--mamba2-headdim", "16", "--models", *models).stdout
    rows = {row[1]: row for row in table_rows(out, "2 x 32")}
    assert list(rows) == models, out
    mamba_ms = float(rows["lethe-mamba"][3].split()[0])
    for name, row in rows.items():
        ms = float(row[3].split()[0])
        assert float(row[4].replace(",", "")) == pytest.approx(2 * 32 / (ms / 1e3), rel=0.02, abs=1)  # tokens/s of that time
        assert float(row[5].rstrip("x")) == pytest.approx(mamba_ms / ms, rel=0.06, abs=0.02)  # the ratio of the printed times
    # the same architecture everywhere: transformers' Mamba has Lethe's parameter count, the Transformer++ is matched to it
    params = {name: float(row[2].rstrip("M")) for name, row in rows.items()}
    assert params["hf-mambapy"] == params["lethe-mamba"]
    assert all(abs(params[name] / params["lethe-mamba"] - 1) < 0.05 for name in ("lethe-transformer", "lethe-mamba2", "lethe-hybrid"))
