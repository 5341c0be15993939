"""`megagpt bench data` at toy sizes: each table's header once, before its rows; rows printed once; the JSON."""

import json
from pathlib import Path

from benchmarks.data import main


def test_throughput_prints_each_header_before_its_rows_and_each_row_once(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--corpus-mb", "0.05", "--kinds", "char", "--workers", "1", "2", "--repeat", "1", "--batches", "3",
                 "--batch-size", "2", "--block-size", "16", "--work-dir", str(tmp_path / "work"),
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(out.read_text())
    assert set(result) == {"date", "machine", "corpus_bytes", "batch", "prep", "loader"}
    assert [(r["kind"], r["workers"]) for r in result["prep"]] == [("char", 1), ("char", 2)]
    header = [i for i, line in enumerate(lines) if line.split()[:2] == ["tokenizer", "workers"]]
    rows = [i for i, line in enumerate(lines) if line.split()[:1] == ["char"] and line.split()[1].isdigit()]
    assert len(header) == 1 and rows == [header[0] + 1, header[0] + 2]  # header, then the two rows, once
    loader = lines.index("loader, batch 2x16")
    names = [line[:42].strip() for line in lines[loader + 1:loader + 4]]
    assert names == [r["loader"] for r in result["loader"]] and lines.count(lines[loader + 1]) == 1
    assert lines[-1] == f"wrote {out}"
    assert all(Path(r["dataset"]).parent == tmp_path / "work" for r in result["prep"])  # kept: --work-dir


def test_the_json_names_no_dataset_of_a_temporary_work_dir(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--corpus-mb", "0.02", "--kinds", "char", "--workers", "1", "--repeat", "1", "--batches", "2",
                 "--batch-size", "2", "--block-size", "16", "--out", str(out)]) == 0
    prep = json.loads(out.read_text())["prep"]
    assert prep and all("dataset" not in r for r in prep)  # it was in the temp dir, removed
