"""The kernel benchmark in its interpreter mode: runs end to end at toy sizes and writes every output."""

import csv
import importlib.util
import json

import pytest

import kernels.bench
from kernels import compile_check


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



# ---------------------------------------------------------------- bad input: refused before any work, one line
@pytest.mark.parametrize("flags, named", [
    (["--seq-len", "0"], "--seq-len 0: must be at least 1"),
    (["--head-dim", "7"], "--head-dim 7: unsupported (the kernel takes 16 <= D <= 128)"),
    (["--width", "70000"], "--width 70000: unsupported (the kernel takes 1 <= C <= 65536)"),
    (["--kernel", "attention", "--width", "64"], "--width sizes layernorm, which --kernel attention leaves out"),
    (["--kernel", "layernorm", "--head-dim", "16"], "--head-dim sizes attention, which --kernel layernorm leaves"),
])
def test_bench_refuses_sizes_the_kernels_cannot_take(flags, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        kernels.bench.main([*flags, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_refuses_an_out_inside_a_file_before_benchmarking(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit):
        kernels.bench.main(["--quick", "--out", str(tmp_path / "file" / "sub")])
    printed = capsys.readouterr()
    assert "--out" in printed.err and "a file is in the way" in printed.err
    assert "triton" not in printed.out  # nothing was timed


def test_bench_names_the_flag_whose_inputs_do_not_fit_in_memory(tmp_path, capsys):
    seq_len = 2**40  # 1 x 2 x 2^40 x 16 fp32: 128 TiB, refused by the allocator at once
    assert kernels.bench.main(["--kernel", "attention", "--seq-len", str(seq_len), "--head-dim", "16",
                               "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--seq-len {seq_len} --head-dim 16: the inputs (1, 2, {seq_len}, 16) do not fit" in err
    assert "Traceback" not in err and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("spec, named", [
    ("T=abc,D=64,C=384", "'T=abc': not an integer"), ("T=0,D=64,C=384", "'T=0': T is at least 1"),
    ("T=256,D=7,C=384", "'D=7': unsupported"), ("T=256,D=64,C=0", "'C=0': unsupported"),
    ("T=256,D=64,C=384,dropout=nan", "'dropout=nan': dropout is in [0, 1)"),
    ("T=256,D=64,C=384,dropout=1", "'dropout=1': dropout is in [0, 1)"),
    ("T=256,D=64,C=384,bias=maybe", "'bias=maybe': bias is 0 or 1"), ("T=256,D=64", "T, D and C are required"),
])
def test_compile_check_refuses_a_first_step_the_kernels_cannot_take(spec, named, capsys):
    with pytest.raises(SystemExit) as stop:
        compile_check.main(["--first-step", spec])
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_compile_check_reads_a_good_first_step():
    step = compile_check.parse_first_step("T=256, D=64, C=384, dropout=0.2, dtype=fp16, bias=0")
    assert step == compile_check.FirstStep(T=256, D=64, C=384, dtype="fp16", dropout=0.2, bias=False)


ONE_STEP = ["--first-step", "T=16,D=16,C=8", "--kernel", "ln_column_sum"]  # one compile, were it to run


@pytest.mark.parametrize("flags, named", [
    (["--jobs", "0"], "--jobs 0: must be at least 1"), (["--out", "FILE"], "a file is in the way"),
    # the spec replaces the matrix: they were silently ignored
    ([*ONE_STEP, "--dtype", "fp16"], "--dtype does not apply to --first-step"),
    ([*ONE_STEP, "--quick"], "--quick does not apply to --first-step"),
])
def test_compile_check_refuses_bad_flags_before_compiling(flags, named, tmp_path, capsys):
    (tmp_path / "FILE").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        compile_check.main([f.replace("FILE", str(tmp_path / "FILE")) for f in flags])
    assert stop.value.code == 2 and named in capsys.readouterr().err
