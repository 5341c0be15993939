"""`megagpt bench data`: prep throughput by worker count; loader tokens/s against a nanoGPT-style baseline;
`--scale`: start-up, resume, shuffle and prep bookkeeping on synthetic datasets of 1 G to 1 T tokens."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.prep import PrepSettings, prepare
from megagpt.errors import UserError, refuse_file_in_the_way
from megagpt.files import write_whole

SPM_VOCAB = 4096  # the sentencepiece prep's pieces
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
    from megagpt.dataset import Dataset

    dataset = Dataset(out)
    tables = [dataset.shards(split) for split in dataset.manifest.splits]
    tokens = sum(int(t.tokens.sum()) for t in tables)
    payload = tokens * np.dtype(dataset.manifest.token_dtype).itemsize
    return {"kind": kind, "workers": workers, "seconds": seconds, "mb_per_s": corpus_bytes / 1e6 / seconds,
            "tokens_per_s": tokens / seconds, "tokens": tokens, "shards": sum(map(len, tables)),
            "tar_overhead_pct": 100 * (sum(int(t.records["bytes"].sum()) for t in tables) / payload - 1),
            "dataset": str(out),
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
    p.add_argument("--repeat", type=int, default=3,
                   help="preps per setting (--scale: probes per size); the fastest counts")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--work-dir", default=None, help="scratch space (default: a temp dir, removed afterwards)")
    p.add_argument("--scale", action="store_true",
                   help="instead: start-up, resume, shuffle and prep bookkeeping at --sizes tokens (synthetic)")
    p.add_argument("--sizes", type=float, nargs="+", default=list(SCALE_SIZES), help="train tokens, with --scale")
    p.add_argument("--probe", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)  # one measurement
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.probe:
        print(json.dumps(PROBES[args.probe[0]](args.probe[1])))
        return 0
    _check_args(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="megagpt-bench-data-"))
    try:
        results = (bench_scale(work, [int(s) for s in args.sizes], args.repeat) if args.scale
                   else bench_throughput(args, work))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.work_dir is None:  # the datasets were in the temp dir, gone now
        for row in results.get("prep", []):
            row.pop("dataset")
    write_whole(args.out, json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _check_args(args) -> None:
    """Every number in range and --out writable, before minutes of measuring: a one-line error, nothing lost."""
    at_least = {"--workers": (min(args.workers), 1), "--repeat": (args.repeat, 1), "--batches": (args.batches, 1),
                "--batch-size": (args.batch_size, 1), "--block-size": (args.block_size, 1),
                "--corpus-mb": (args.corpus_mb, 0.001), "--sizes": (min(args.sizes), MIN_SCALE_TOKENS)}
    for flag, (value, least) in at_least.items():
        if not least <= value < math.inf:  # also refuses nan
            raise UserError(f"{flag} {value}: must be at least {least}")
    if args.work_dir is not None:
        refuse_file_in_the_way(Path(args.work_dir), f"--work-dir {args.work_dir}", "give a folder for scratch space")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the JSON file's path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot make its folder {out.parent} ({e.strerror})") from None


def bench_throughput(args, work: Path) -> dict:
    """The prep table (its header first, each kind's rows as they finish) and the loader table."""
    corpus_bytes = make_corpus(work / "corpus", args.corpus_mb)
    print(f"prep, {corpus_bytes / 1e6:.3g} MB corpus\n{PREP_HEADER}", flush=True)
    prep = []
    for kind in args.kinds:
        extra = {"vocab_size": SPM_VOCAB, "sample_size": 100_000} if kind == "sentencepiece" else {}
        try:
            rows = bench_prep(work / "corpus", work, corpus_bytes, kind, args.workers, args.repeat, **extra)
        except UserError as e:  # its advice names prep's flags; the corpus's size is this command's
            if kind != "sentencepiece":
                raise
            raise UserError(f"--corpus-mb {args.corpus_mb}: too little text for sentencepiece's {SPM_VOCAB} pieces "
                            f"({str(e).split(':')[0]}); pass a larger --corpus-mb, or --kinds char") from None
        prep += rows
        print("\n".join(_row(row) for row in rows), flush=True)
    _print_speedups(prep)
    dataset = Path(prep[0]["dataset"])
    shape = (args.batches, args.batch_size, args.block_size)
    print(f"\nloader, batch {args.batch_size}x{args.block_size}", flush=True)
    loaders = [bench_baseline(dataset, work, *shape)]
    print(_loader_row(loaders[0], loaders[0]), flush=True)
    for w in (0, 2):
        loaders.append(bench_loader(dataset, w, *shape))
        print(_loader_row(loaders[-1], loaders[0]), flush=True)
    return {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "corpus_bytes": corpus_bytes,
            "batch": [args.batch_size, args.block_size], "prep": prep, "loader": loaders}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, " \
           f"{platform.platform()}"


# ---------------------------------------------------------------- --scale: real code paths, synthetic sizes

SCALE_SIZES = (1e9, 1e10, 1e11, 1e12)
SAMPLE_TOKENS = 1 << 20  # prep's defaults: 1 Mi-token members, 256 MB shards of uint16 tokens
SHARD_TOKENS = 1 << 27
BLOCK_SIZE, BATCH = 1024, 8  # a GPT-2-sized run's windows and micro-batch
MIN_SCALE_TOKENS = 2 * BLOCK_SIZE * BATCH + 1  # --sizes: the probes resume 1.5 epochs of whole batches in


def make_synthetic(directory: Path, train_tokens: int) -> Path:
    """A dataset dir described by its size only: zero tokens in sparse tars with real ustar headers (so tarfile
    and `megagpt data verify` read them as prep's), their indexes, the shard tables and the manifest. Full shards
    are hard links to one file, so 1 T tokens take seconds and no disk; a loader opens, checks and memmaps them
    like any."""
    from megagpt.dataset import (
        FORMAT_VERSION,
        Manifest,
        shard_name,
        tokenizer_info,
        write_manifest,
        write_shard_table,
    )

    directory.mkdir(parents=True)
    templates: dict[int, dict] = {}
    splits = {}
    for split, tokens in (("train", train_tokens), ("val", SAMPLE_TOKENS)):
        shards = []
        for k, start in enumerate(range(0, tokens, SHARD_TOKENS)):
            n = min(SHARD_TOKENS, tokens - start)
            name = shard_name(split, k)
            if n not in templates:
                templates[n] = _synthetic_shard(directory / name, n)
            else:
                for suffix in (".tar", ".idx"):
                    template = (directory / templates[n]["name"]).with_suffix(suffix)
                    os.link(template, (directory / name).with_suffix(suffix))
            shards.append({**templates[n], "name": name})
        splits[split] = write_shard_table(directory, split, shards)
    vocab_size = 50304
    (directory / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": list(map(chr, range(vocab_size))),
                                                          "eos_id": None}))  # as large as the manifest says
    write_manifest(directory, Manifest(
        format_version=FORMAT_VERSION, tokenizer=tokenizer_info("char", directory / "tokenizer.json"),
        vocab_size=vocab_size,
        token_dtype="uint16", sample_tokens=SAMPLE_TOKENS, splits=splits,
        sources={"files": 1, "bytes": 0, "sha256": "", "list": "sources.jsonl"}))
    return directory


def _synthetic_shard(path: Path, tokens: int) -> dict:
    from megagpt.dataset import INDEX_RECORD, sha256_file

    index, pos = [], 0
    with open(path, "wb") as f:
        for k, lo in enumerate(range(0, tokens, SAMPLE_TOKENS)):
            nbytes = 2 * min(SAMPLE_TOKENS, tokens - lo)
            info = tarfile.TarInfo(f"{k:06d}.tokens")
            info.size, info.mtime, info.mode, info.uname, info.gname = nbytes, 0, 0o444, "megagpt", "megagpt"
            header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            f.seek(pos)
            f.write(header)
            index.append((pos + len(header), nbytes, hashlib.sha256(bytes(nbytes)).digest()))
            pos += len(header) + -(-nbytes // 512) * 512
        f.truncate(-(-(pos + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE)  # end blocks, whole records
    raw = np.array(index, dtype=INDEX_RECORD).tobytes()
    path.with_suffix(".idx").write_bytes(raw)
    return {"name": path.name, "samples": len(index), "tokens": tokens, "bytes": path.stat().st_size,
            "sha256": sha256_file(path), "index_sha256": hashlib.sha256(raw).hexdigest(), "max_token": 0}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _read_mb() -> float:
    """Bytes this process has read by read() calls, plus the file pages it has mapped in (its memmaps)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    with open("/proc/self/status") as f:
        mapped_kb = next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))
    return int(fields["rchar"]) / 1e6 + mapped_kb * 1024 / 1e6


def probe_loader(dataset_dir: str) -> dict:
    """In a fresh process: manifest, loader start-up to the first batch, a resume 1.5 epochs in, the shuffle."""
    from megagpt.data import TrainLoader
    from megagpt.dataset import MANIFEST, Dataset, table_name

    base, read0, clock = _rss_mib(), _read_mb(), time.perf_counter()
    dataset = Dataset(dataset_dir)
    manifest_s, manifest_mib = time.perf_counter() - clock, _rss_mib() - base
    dataset.shards("train")  # the loader's first step, timed on its own
    table_s = time.perf_counter() - clock - manifest_s
    loader = TrainLoader(dataset, BLOCK_SIZE, BATCH)
    next(loader)
    startup_s, startup_read, first_batch_at = time.perf_counter() - clock, _read_mb() - read0, time.time()
    state = loader.state_dict()
    state["windows_consumed"] = loader.num_windows * 3 // 2 // BATCH * BATCH
    clock = time.perf_counter()
    resumed = TrainLoader(Dataset(dataset_dir), BLOCK_SIZE, BATCH)
    resumed.load_state_dict(state)
    next(resumed)
    resume_s = time.perf_counter() - clock
    windows = resumed.dataset  # position -> window: what a new epoch costs, then a batch
    positions = np.arange(BATCH) + 5 * loader.num_windows + 12345
    before, clock = _rss_mib(), time.perf_counter()
    windows.window_ids(positions)
    epoch_s, epoch_mib = time.perf_counter() - clock, _rss_mib() - before
    clock = time.perf_counter()
    for _ in range(200):
        windows.window_ids(positions)
    sizes = {"manifest_bytes": (Path(dataset_dir) / MANIFEST).stat().st_size,
             "table_bytes": (Path(dataset_dir) / table_name("train")).stat().st_size}
    return {"manifest_s": manifest_s, "manifest_mib": manifest_mib, "table_s": table_s, **sizes,
            "startup_s": startup_s,
            "startup_read_mb": startup_read, "first_batch_at": first_batch_at, "resume_s": resume_s,
            "new_epoch_s": epoch_s,
            "new_epoch_mib": epoch_mib, "shuffle_us_per_batch": (time.perf_counter() - clock) / 200 * 1e6,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "num_windows": loader.num_windows}


def probe_prep(tokens: str) -> dict:
    """In a fresh process: prep's bookkeeping for a corpus of `tokens` (1 Mi-token chunks, 256 MB shards),
    through prep's own progress log and shard layout: append every record, replay the log, build the jobs."""
    from data_prep.prep import PrepSettings, _Layout, _Progress

    settings, total = PrepSettings(), int(float(tokens))
    chunks = -(-total // settings.chunk_chars)
    work = Path(tempfile.mkdtemp(prefix="megagpt-bench-prep-")) / "ds.partial"
    try:
        base, clock = _rss_mib(), time.perf_counter()
        progress = _Progress(work, "bench")
        for i in range(chunks):
            progress.append({"chunk": i, "tokens": min(settings.chunk_chars, total - i * settings.chunk_chars),
                             "sha256": "0" * 64, "dtype": "uint16"})
        progress.append({"tokenized": {"chunks": chunks, "documents": 1, "sources": {}}})
        jobs = list(_Layout(progress, settings, "uint16").jobs(str(work / "chunks"), None))
        for job in jobs:
            progress.append({"shard": {"name": job.name, "samples": 128, "tokens": job.end - job.start,
                                       "bytes": 0, "sha256": "0" * 64, "index_sha256": "0" * 64,
                                       "max_token": 0}})
        progress.close()
        log_s, log_mib = time.perf_counter() - clock, _rss_mib() - base
        clock = time.perf_counter()
        _Progress(work, "bench").close()
        return {"chunks": chunks, "shards": len(jobs), "bookkeeping_s": log_s, "per_update_us":
                log_s / (chunks + len(jobs)) * 1e6, "replay_s": time.perf_counter() - clock,
                "bookkeeping_mib": log_mib, "largest_job_bytes": max(len(pickle.dumps(j)) for j in jobs),
                "log_mb": (work / _Progress.FILE).stat().st_size / 1e6}
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


PROBES = {"loader": probe_loader, "prep": probe_prep}


def _run_probe(kind: str, arg: str) -> dict:
    """A probe in a fresh process; process_startup_s: from launching it to its first batch (imports included)."""
    launched = time.time()
    out = subprocess.run([sys.executable, "-m", "benchmarks.data", "--probe", kind, arg], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if "first_batch_at" in result:
        result["process_startup_s"] = result.pop("first_batch_at") - launched
    return result


def bench_scale(work: Path, sizes: list[int], repeat: int = 1) -> dict:
    """Per size, the fastest of `repeat` fresh probe processes (a shared machine's noise only slows one down)."""
    rows = []
    print(SCALE_HEADER)
    for tokens in sizes:
        clock = time.perf_counter()
        dataset = make_synthetic(work / f"synthetic-{tokens:.0e}", tokens)
        made_s = time.perf_counter() - clock
        loader = min((_run_probe("loader", str(dataset)) for _ in range(repeat)), key=lambda r: r["startup_s"])
        prep = min((_run_probe("prep", str(tokens)) for _ in range(repeat)), key=lambda r: r["bookkeeping_s"])
        row = {"tokens": tokens, "make_s": made_s, **loader, **prep}
        shutil.rmtree(dataset)
        rows.append(row)
        print(_scale_row(row), flush=True)
    return {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "block_size": BLOCK_SIZE, "batch": BATCH,
            "repeat": repeat, "scale": rows}


def _scale_row(r: dict) -> str:
    return (f"{r['tokens']:>8.0e} {r['manifest_s'] * 1e3:>8.2f} {r['table_s'] * 1e3:>8.2f} "
            f"{r['startup_s']:>8.3f} {r['process_startup_s']:>8.2f} "
            f"{r['startup_read_mb']:>8.1f} "
            f"{r['resume_s']:>8.3f} {r['new_epoch_mib']:>8.1f} {r['shuffle_us_per_batch']:>8.0f} "
            f"{r['peak_rss_mib']:>8.0f} "
            f"{r['bookkeeping_s']:>8.2f} {r['per_update_us']:>7.1f} {r['replay_s']:>7.2f} "
            f"{r['bookkeeping_mib']:>7.1f} {r['largest_job_bytes']:>8}")


SCALE_HEADER = (f"{'tokens':>8} {'manif ms':>8} {'table ms':>8} {'start s':>8} {'proc s':>8} {'read MB':>8} "
                f"{'resume s':>8} "
                f"{'epoch MiB':>8} "
                f"{'shuf us':>8} "
                f"{'peak MiB':>8} {'book s':>8} {'us/upd':>7} {'replay':>7} {'bk MiB':>7} {'job B':>8}")


PREP_HEADER = (f"{'tokenizer':<14}{'workers':>8}{'seconds':>10}{'MB/s':>10}{'Mtokens/s':>14}{'tar ovh %':>12}"
               f"{'vocab s':>12}{'encode s':>12}{'shards s':>10}")


def _row(r: dict) -> str:
    return (f"{r['kind']:<14}{r['workers']:>8}{r['seconds']:>10.2f}{r['mb_per_s']:>10.1f}"
            f"{r['tokens_per_s'] / 1e6:>14.2f}{r['tar_overhead_pct']:>12.3f}"
            f"{r['tokenizer_s']:>12.2f}{r['tokenize_s']:>12.2f}{r['shards_s']:>10.2f}")


def _loader_row(r: dict, baseline: dict) -> str:
    speedup = r["tokens_per_s"] / baseline["tokens_per_s"]
    return f"{r['loader']:<42}{r['tokens_per_s'] / 1e6:>10.2f} Mtok/s{speedup:>8.2f}x"


def _print_speedups(prep: list[dict]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in prep):
        rows = {r["workers"]: r for r in prep if r["kind"] == kind}
        if 1 in rows and 2 in rows:
            work = lambda r: r["tokenize_s"] + r["shards_s"]
            enc = work(rows[1]) / work(rows[2])
            print(f"{kind}: 2 workers are {rows[1]['seconds'] / rows[2]['seconds']:.2f}x faster than 1 "
                  f"(encode + shards: {enc:.2f}x)")


if __name__ == "__main__":  # the --scale probes run as fresh processes
    sys.exit(main())
