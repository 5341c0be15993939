"""`megagpt bench data`: prep throughput by worker count; loader tokens/s against a nanoGPT-style baseline."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.prep import PrepSettings, prepare

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"  # optional


def make_corpus(root: Path, megabytes: float, files: int = 8) -> int:
    """`files` .txt documents of Shakespeare repeated (random words when it is absent); total bytes."""
    if SHAKESPEARE.is_file():
        base = SHAKESPEARE.read_text()
    else:
        rng = np.random.default_rng(0)
        words = ["the", "king", "of", "and", "my", "lord", "thou", "art", "\n", "to", "be", "not"]
        base = " ".join(rng.choice(words, 200_000))
    per_file = int(megabytes * 1e6 / files)
    text = (base * (per_file // len(base) + 1))[:per_file]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"part-{i:02d}.txt").write_text(text)
    return per_file * files


def bench_prep(corpus: Path, work: Path, corpus_bytes: int, kind: str, workers: list[int],
               repeat: int = 1, **extra) -> list[dict]:
    """Per worker count, the fastest of `repeat` fresh preps; the counts alternate round by round so that
    a shared machine's load hits them alike (noise only ever slows a run down)."""
    best: dict[int, tuple[float, dict]] = {}
    for _ in range(repeat):
        for w in workers:
            out = work / f"{kind}-w{w}"
            settings = PrepSettings(tokenizer=kind, workers=w, shard_size_mb=8, **extra)
            start, timings = time.perf_counter(), {}
            prepare([corpus], out, settings, force=True, timings=timings)
            seconds = time.perf_counter() - start
            if seconds < best.get(w, (float("inf"),))[0]:
                best[w] = (seconds, timings)
    return [_prep_result(work / f"{kind}-w{w}", corpus_bytes, kind, w, *best[w]) for w in workers]


def _prep_result(out: Path, corpus_bytes: int, kind: str, workers: int, seconds: float,
                 timings: dict) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    tokens = sum(s["tokens"] for s in shards)
    payload = tokens * np.dtype(manifest["token_dtype"]).itemsize
    return {"kind": kind, "workers": workers, "seconds": seconds, "mb_per_s": corpus_bytes / 1e6 / seconds,
            "tokens_per_s": tokens / seconds, "tokens": tokens, "shards": len(shards),
            "tar_overhead_pct": 100 * (sum(s["bytes"] for s in shards) / payload - 1), "dataset": str(out),
            **{k: round(v, 3) for k, v in timings.items()}}


def bench_loader(dataset: Path, workers: int, batches: int, batch_size: int, block_size: int) -> dict:
    from megagpt.data import TrainLoader

    loader = TrainLoader(dataset, block_size, batch_size, num_workers=workers)
    for _ in range(5):  # warm up: worker start, shard verification, page cache
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    tokens = batches * batch_size * block_size
    return {"loader": f"megagpt TrainLoader, {workers} workers", "tokens_per_s": tokens / seconds}


def bench_baseline(dataset: Path, work: Path, batches: int, batch_size: int, block_size: int) -> dict:
    """nanoGPT's get_batch: a flat uint16 .bin, np.memmap, random offsets, torch.stack of per-row slices."""
    from megagpt.data import TokenStream
    from megagpt.dataset import Dataset

    stream = TokenStream(Dataset(dataset), "train")
    flat = np.empty(stream.num_tokens, dtype=np.uint16)
    stream.read(0, stream.num_tokens, flat)
    path = work / "train.bin"
    flat.tofile(path)
    data = np.memmap(path, dtype=np.uint16, mode="r")

    def get_batch():
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    for _ in range(5):
        get_batch()
    start = time.perf_counter()
    for _ in range(batches):
        get_batch()
    seconds = time.perf_counter() - start
    tokens = batches * batch_size * block_size
    return {"loader": "nanoGPT baseline (memmap + torch.stack)", "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt bench data", description=__doc__)
    p.add_argument("--out", default="bench_data.json", help="JSON results")
    p.add_argument("--corpus-mb", type=float, default=32.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--kinds", nargs="+", default=["char", "sentencepiece"], choices=["char", "sentencepiece"])
    p.add_argument("--repeat", type=int, default=3, help="preps per setting; the fastest counts")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--work-dir", default=None, help="scratch space (default: a temp dir, removed afterwards)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="megagpt-bench-data-"))
    try:
        corpus_bytes = make_corpus(work / "corpus", args.corpus_mb)
        prep = []
        for kind in args.kinds:
            extra = {"vocab_size": 4096, "sample_size": 100_000} if kind == "sentencepiece" else {}
            rows = bench_prep(work / "corpus", work, corpus_bytes, kind, args.workers, args.repeat, **extra)
            for row in rows:
                prep.append(row)
                print(_row(row), flush=True)
        dataset = Path(prep[0]["dataset"])
        shape = (args.batches, args.batch_size, args.block_size)
        loaders = [bench_baseline(dataset, work, *shape)]
        loaders += [bench_loader(dataset, w, *shape) for w in (0, 2)]
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}"
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "corpus_bytes": corpus_bytes,
               "batch": [args.batch_size, args.block_size], "prep": prep, "loader": loaders}
    _print_tables(results)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _row(r: dict) -> str:
    return (f"{r['kind']:<14}{r['workers']:>8}{r['seconds']:>10.2f}{r['mb_per_s']:>10.1f}"
            f"{r['tokens_per_s'] / 1e6:>14.2f}{r['tar_overhead_pct']:>12.3f}"
            f"{r['tokenizer_s']:>12.2f}{r['tokenize_s']:>12.2f}{r['shards_s']:>10.2f}")


def _print_tables(results: dict) -> None:
    print(f"\nprep, {results['corpus_bytes'] / 1e6:.0f} MB corpus")
    print(f"{'tokenizer':<14}{'workers':>8}{'seconds':>10}{'MB/s':>10}{'Mtokens/s':>14}{'tar ovh %':>12}"
          f"{'vocab s':>12}{'encode s':>12}{'shards s':>10}")
    for r in results["prep"]:
        print(_row(r))
    for kind in {r["kind"] for r in results["prep"]}:
        rows = {r["workers"]: r for r in results["prep"] if r["kind"] == kind}
        if 1 in rows and 2 in rows:
            work = lambda r: r["tokenize_s"] + r["shards_s"]
            enc = work(rows[1]) / work(rows[2])
            print(f"{kind}: 2 workers are {rows[1]['seconds'] / rows[2]['seconds']:.2f}x faster than 1 "
                  f"(encode + shards: {enc:.2f}x)")
    b, t = results["batch"]
    print(f"\nloader, batch {b}x{t}")
    base = results["loader"][0]["tokens_per_s"]
    for r in results["loader"]:
        print(f"{r['loader']:<42}{r['tokens_per_s'] / 1e6:>10.2f} Mtok/s{r['tokens_per_s'] / base:>8.2f}x")
