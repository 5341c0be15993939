"""The kernel benchmark in its interpreter mode: runs end to end at toy sizes and writes every output."""

import csv
import importlib.util
import json

import kernels.bench


def test_quick_bench_writes_table_csv_json_and_plots(tmp_path, capsys):
    assert kernels.bench.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "INTERPRETER TIMINGS, NOT PERFORMANCE" in printed

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    impls = {(r["kernel"], r["impl"]) for r in rows}
    assert {("attention", "triton"), ("attention", "sdpa-math"), ("layernorm", "triton"),
            ("layernorm", "torch")} <= impls
    for r in rows:
        assert float(r["fwd_ms"]) > 0 and float(r["bwd_ms"]) > 0 and float(r["fwd_bwd_ms"]) > 0
        # the rate column is the size of the work over the measured time, as documented
        if r["kernel"] == "attention":
            B, H, T, D = (int(r[k]) for k in "BHTD")
            flops = 4 * B * H * T * T * D / 2
            assert abs(float(r["fwd_rate"]) - flops / (float(r["fwd_ms"]) * 1e-3) / 1e12) <= 1e-3 * float(
                r["fwd_rate"])
        else:
            nbytes = 2 * int(r["rows"]) * int(r["C"]) * 4  # fp32: read x, write y
            assert abs(float(r["fwd_rate"]) - nbytes / (float(r["fwd_ms"]) * 1e-3) / 1e9) <= 1e-3 * float(
                r["fwd_rate"])

    result = json.loads((tmp_path / "results.json").read_text())
    assert result["interpreter"] is True and result["dtype"] == "fp32"
    assert len(result["rows"]) == len(rows)
    table = (tmp_path / "table.txt").read_text()
    assert "not performance" in table.lower() and "sdpa-math" in table

    if importlib.util.find_spec("matplotlib") is not None:
        for kernel in ("attention", "layernorm"):
            png = tmp_path / f"{kernel}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in printed


def test_bf16_without_gpu_is_a_clear_error(tmp_path, capsys):
    assert kernels.bench.main(["--dtype", "bf16", "--out", str(tmp_path)]) == 2
    assert "bf16 needs a GPU" in capsys.readouterr().err


def test_skip_notes_quote_the_error_whole_or_cut_at_a_sentence_end():
    sdpa = ("No viable backend for scaled_dot_product_attention was found. This is likely due to turning off both "
            "the math kernel and the fused kernels.")  # torch's, once cut to "... This is likely due"
    assert kernels.bench._reason(RuntimeError(sdpa + "\n  detail line")) == sdpa
    long = "The first sentence. The second sentence. " + "w" * 300
    assert kernels.bench._reason(RuntimeError(long)) == "The first sentence. The second sentence."
    assert kernels.bench._reason(RuntimeError("z" * 300)) == "z" * 300  # no sentence end: whole
    assert kernels.bench._reason(RuntimeError("")) == "RuntimeError"
