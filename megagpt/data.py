"""The data loader: a dataset dir's shards as exact, resumable, rank-sliced (x, y) batches of token windows.

The order of training windows is a function of (seed, global position) only:
  window w = tokens [w*B, w*B + B + 1) of a split's token stream (all shards end to end), N windows;
  global position p -> epoch p // N, window perm(seed, epoch)[p % N];
  optimizer step s uses positions [s*G, (s+1)*G), G = micro_batch_size * grad_accum_steps * world_size,
  rank r the contiguous slice [s*G + r*G/W, s*G + (r+1)*G/W), as grad_accum_steps micro-batches in order.
So a checkpoint (one global position) resumes exactly, on any world size with the same G.

Local shards are read by random access: each tar's members are indexed once (payloads are stored contiguously
and uncompressed, 512-byte aligned) and the whole file is np.memmap'ed as tokens. Shards whose names are URLs
(`pipe:...`, `http://...`) are streamed with webdataset instead (windows in corpus order; see docs/data.md).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megagpt.dataset import DataError, Dataset, ShardInfo, as_dataset, sha256_file
from megagpt.distributed import warn_once

STATE_VERSION = 1
EVAL_SEED = 0  # eval windows come from a fixed permutation: the same batches at every evaluation


def _is_url(name: str) -> bool:
    return name.startswith("pipe:") or "://" in name


# ---------------------------------------------------------------- local shards: index, verify, random access


def index_tar(path: Path, shard: ShardInfo, itemsize: int) -> list[tuple[int, int]]:
    """(token offset in the file, token count) per sample; DataError if the tar and manifest disagree."""
    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise DataError(f"{path}: shard listed in the manifest is missing")
    members = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.offset_data + info.size > size or info.size % itemsize:
                    raise DataError(f"{path}: truncated or corrupt shard (member {info.name})")
                members.append((info.offset_data // itemsize, info.size // itemsize))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: truncated or corrupt shard ({e})") from None
    tokens = sum(n for _, n in members)
    if len(members) != shard.samples or tokens != shard.tokens:
        raise DataError(f"{path}: truncated or corrupt shard ({len(members)} samples / {tokens} tokens, "
                        f"the manifest says {shard.samples} / {shard.tokens})")
    return members


def verify_shard(path: Path, shard: ShardInfo, members, tokens: np.ndarray, vocab_size: int) -> None:
    """sha256 against the manifest and every token id < vocab_size, or a DataError naming the shard."""
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise DataError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                        f"{shard.sha256[:12]}...; the shard is corrupt or was replaced: re-run prep")
    for offset, n in members:
        top = int(tokens[offset:offset + n].max()) if n else -1
        if top >= vocab_size:
            raise DataError(f"{path}: token id {top} >= vocab_size {vocab_size}; the shard does not "
                            f"belong to this manifest's tokenizer")


class TokenStream:
    """A split's tokens (its usable shards end to end), random access by global token offset."""

    def __init__(self, dataset: Dataset, split: str, on_corrupt_shard: str = "error"):
        if on_corrupt_shard not in ("error", "skip"):
            raise ValueError(f"on_corrupt_shard={on_corrupt_shard!r}: expected 'error' or 'skip'")
        self.dir = dataset.dir
        self.dtype = np.dtype(dataset.manifest.token_dtype).newbyteorder("<")
        self.vocab_size = dataset.vocab_size
        self.skipped_shards = 0
        self.shards, self.members = [], []
        eager = on_corrupt_shard == "skip"  # skipping decides up front, so every rank sees the same windows
        for shard in dataset.manifest.split(split).shards:
            path = self.dir / shard.name
            try:
                members = index_tar(path, shard, self.dtype.itemsize)
                if eager:
                    verify_shard(path, shard, members, self._memmap(path), self.vocab_size)
            except DataError as e:
                if not eager:
                    raise
                warn_once(f"skipping shard: {e}")
                self.skipped_shards += 1
                continue
            self.shards.append((path, shard))
            self.members.append(members)
        # One segment per sample: its start in the stream, its length, its shard and offset in that file.
        segs = [(k, off, n) for k, ms in enumerate(self.members) for off, n in ms if n]
        self.seg_shard = np.array([s[0] for s in segs], dtype=np.int64)
        self.seg_offset = np.array([s[1] for s in segs], dtype=np.int64)
        self.seg_len = np.array([s[2] for s in segs], dtype=np.int64)
        self.seg_start = np.concatenate([[0], np.cumsum(self.seg_len)]).astype(np.int64)
        self.num_tokens = int(self.seg_start[-1])
        self._maps: dict[int, np.ndarray] = {}
        self._verified = set(range(len(self.shards))) if eager else set()

    def __getstate__(self):  # DataLoader workers re-open the memmaps themselves
        return {**self.__dict__, "_maps": {}}

    def _memmap(self, path: Path) -> np.ndarray:
        return np.memmap(path, dtype=self.dtype, mode="r").view(np.ndarray)

    def _tokens_of(self, k: int) -> np.ndarray:
        if k not in self._maps:
            path, shard = self.shards[k]
            tokens = self._memmap(path)
            if k not in self._verified:  # checked once per process, before any of its tokens is used
                verify_shard(path, shard, self.members[k], tokens, self.vocab_size)
                self._verified.add(k)
            self._maps[k] = tokens
        return self._maps[k]

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Tokens [start, start+length) into out, across sample and shard boundaries."""
        done = 0
        seg = int(np.searchsorted(self.seg_start, start, side="right")) - 1
        while done < length:
            lo = start + done - int(self.seg_start[seg])
            take = min(length - done, int(self.seg_len[seg]) - lo)
            src = self._tokens_of(int(self.seg_shard[seg]))
            base = int(self.seg_offset[seg]) + lo
            out[done:done + take] = src[base:base + take]
            done += take
            seg += 1

    def windows(self, window_ids: np.ndarray, block_size: int) -> np.ndarray:
        """Tokens [w*B, w*B+B+1) of each window w as rows (n, B+1), in the shards' compact dtype."""
        n, span = len(window_ids), block_size + 1
        buf = np.empty((n, span), dtype=self.dtype)
        starts = np.asarray(window_ids, dtype=np.int64) * block_size
        segs = np.searchsorted(self.seg_start, starts, side="right") - 1
        inside = starts + span <= self.seg_start[segs + 1]
        for i in range(n):
            if inside[i]:  # the common case: one slice of one sample
                s = segs[i]
                base = self.seg_offset[s] + starts[i] - self.seg_start[s]
                buf[i] = self._tokens_of(int(self.seg_shard[s]))[base:base + span]
            else:
                self.read(int(starts[i]), span, buf[i])
        return buf


# ---------------------------------------------------------------- the global window order


class WindowDataset(torch.utils.data.Dataset):
    """Map-style over global positions: position p -> window perm(seed, p // N)[p % N]."""

    def __init__(self, stream: TokenStream, block_size: int, seed: int):
        self.stream, self.block_size, self.seed = stream, block_size, seed
        self.num_windows = (stream.num_tokens - 1) // block_size
        if self.num_windows < 1:
            raise DataError(f"{stream.dir}: {stream.num_tokens} usable tokens, fewer than block_size+1 = "
                            f"{block_size + 1}; use a smaller block_size or more data")
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_windows)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[offsets[sel]]
        return out

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, position: int) -> np.ndarray:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: list[int]) -> np.ndarray:  # a DataLoader fetches a micro-batch at once
        # uint16 rows: a quarter of int64's bytes through the worker queue; widened by to_xy in the consumer.
        return self.stream.windows(self.window_ids(np.asarray(positions)), self.block_size)


class StreamingWindows:
    """Windows in corpus order (no permutation) from shards streamed by webdataset: URLs, no random access.

    Position p -> window p % N as above, so the rank/step slicing and the state_dict are the same; resuming
    re-reads from the start of the shard holding the position, and every rank reads the whole stream.
    """

    def __init__(self, dataset: Dataset, split: str, block_size: int):
        self.block_size, self.vocab_size = block_size, dataset.vocab_size
        self.dtype = np.dtype(dataset.manifest.token_dtype).newbyteorder("<")
        self.shards = dataset.manifest.split(split).shards
        self.urls = [s.name if _is_url(s.name) else str(dataset.dir / s.name) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum([s.tokens for s in self.shards])]).astype(np.int64)
        self.num_windows = (int(self.starts[-1]) - 1) // block_size
        self.skipped_shards = 0
        if self.num_windows < 1:
            raise DataError(f"{dataset.dir}: too few tokens in split {split} for block_size {block_size}")

    def _shard_tokens(self, k: int) -> Iterator[np.ndarray]:
        import webdataset as wds

        url, seen = self.urls[k], 0
        try:
            for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
                tokens = np.frombuffer(sample["tokens"], dtype=self.dtype)
                if tokens.size and int(tokens.max()) >= self.vocab_size:
                    raise DataError(f"{url}: token id {int(tokens.max())} >= vocab_size {self.vocab_size}")
                seen += tokens.size
                yield tokens
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{url}: cannot stream shard ({e})") from None
        if seen != self.shards[k].tokens:
            raise DataError(f"{url}: truncated or corrupt shard ({seen} tokens, the manifest says "
                            f"{self.shards[k].tokens})")

    def _tokens_from(self, start: int) -> Iterator[np.ndarray]:
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        skip = start - int(self.starts[k])
        for shard in range(k, len(self.urls)):
            for tokens in self._shard_tokens(shard):
                if skip >= tokens.size:
                    skip -= tokens.size
                    continue
                yield tokens[skip:]
                skip = 0

    def _windows_from(self, position: int) -> Iterator[np.ndarray]:
        B, N = self.block_size, self.num_windows
        while True:  # one pass per epoch
            window, buf = position % N, np.empty(0, dtype=self.dtype)
            for tokens in self._tokens_from(window * B):
                buf = np.concatenate([buf, tokens])
                i = 0
                while i + B + 1 <= buf.size and window < N:
                    yield buf[i:i + B + 1]
                    i, window = i + B, window + 1
                buf = buf[i:]
                if window == N:
                    break
            position += N - position % N

    def batches(self, sampler: RankSampler, global_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        windows, current = None, 0
        for positions in sampler:
            if windows is None:
                windows, current = self._windows_from(positions[0]), positions[0]
            while current < positions[0]:  # other ranks' windows
                next(windows)
                current += 1
            rows = np.stack([next(windows) for _ in positions])
            current += len(positions)
            yield rows


def to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Window rows (n, B+1) -> x = rows[:, :-1], y = rows[:, 1:] as contiguous int64 tensors (n, B)."""
    return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))


def _identity(batch):
    return batch


class RankSampler:
    """This rank's positions, one micro-batch per item, from (step, micro) on: the global schedule above."""

    def __init__(self, micro_batch_size: int, grad_accum_steps: int, rank: int, world_size: int,
                 step: int, micro: int):
        self.mb, self.accum, self.rank, self.world = micro_batch_size, grad_accum_steps, rank, world_size
        self.step, self.micro = step, micro

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.mb * self.accum
        step, micro = self.step, self.micro
        while True:
            first = step * per_rank * self.world + self.rank * per_rank + micro * self.mb
            yield list(range(first, first + self.mb))
            micro += 1
            if micro == self.accum:
                step, micro = step + 1, 0


class TrainLoader:
    """Infinite iterator of (x, y) torch.long CPU tensors (micro_batch_size, block_size) for this rank."""

    def __init__(self, dataset: Dataset | str | Path, block_size: int, micro_batch_size: int,
                 grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1, seed: int = 1337,
                 num_workers: int = 0, on_corrupt_shard: str = "error"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        dataset = as_dataset(dataset)
        self.block_size, self.seed = block_size, seed
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.global_batch = micro_batch_size * grad_accum_steps * world_size  # G windows per optimizer step
        self.streaming = any(_is_url(s.name) for s in dataset.manifest.split("train").shards)
        if self.streaming:
            self.dataset = StreamingWindows(dataset, "train", block_size)
        else:
            self.dataset = WindowDataset(TokenStream(dataset, "train", on_corrupt_shard), block_size, seed)
        self.num_windows = self.dataset.num_windows
        self.step, self.micro = 0, 0
        self._batches = None

    @property
    def skipped_shards(self) -> int:
        return getattr(self.dataset, "stream", self.dataset).skipped_shards

    @property
    def windows_consumed(self) -> int:
        return self.step * self.global_batch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = self._make_batches()
        batch = to_xy(next(self._batches))
        self.micro += 1
        if self.micro == self.grad_accum_steps:
            self.step, self.micro = self.step + 1, 0
        return batch

    def _make_batches(self) -> Iterator:
        sampler = RankSampler(self.micro_batch_size, self.grad_accum_steps, self.rank, self.world_size,
                              self.step, self.micro)
        if self.streaming:
            return self.dataset.batches(sampler, self.global_batch)
        if self.num_workers == 0:
            return (self.dataset.__getitems__(positions) for positions in sampler)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_identity,
                                             num_workers=self.num_workers, pin_memory=False,
                                             prefetch_factor=4)
        return iter(loader)

    def state_dict(self) -> dict:
        return {"format_version": STATE_VERSION, "seed": self.seed,
                "epoch": self.windows_consumed // self.num_windows,
                "windows_consumed": self.windows_consumed, "micro_batches_into_step": self.micro,
                "global_batch_windows": self.global_batch, "num_windows": self.num_windows,
                "block_size": self.block_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue the same global sequence; the world size may change when G (the global batch) does not."""
        if state.get("format_version") != STATE_VERSION:
            raise DataError(f"loader state format {state.get('format_version')!r}, expected {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("block_size", self.block_size),
                          ("num_windows", self.num_windows)):
            if state[key] != mine:
                raise DataError(f"cannot resume the data order: saved {key}={state[key]}, now {mine}")
        consumed, micro = state["windows_consumed"], state["micro_batches_into_step"]
        if consumed % self.global_batch or (micro and state["global_batch_windows"] != self.global_batch) or (
                micro and state["world_size"] != self.world_size):
            raise DataError(f"cannot resume exactly: {consumed} windows consumed (+{micro} micro-batches) "
                            f"with a global batch of {state['global_batch_windows']}, "
                            f"now {self.global_batch}")
        self.step, self.micro = consumed // self.global_batch, micro
        self._batches = None


class EvalWindows:
    """A split's fixed evaluation windows: indexed and shard-checked once, the same batches at every call."""

    def __init__(self, dataset: Dataset | str | Path, split: str, block_size: int):
        self.windows = WindowDataset(TokenStream(as_dataset(dataset), split), block_size, EVAL_SEED)

    def batches(self, micro_batch_size: int, num_batches: int, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """num_batches (x, y) for this rank; ranks take interleaved slices of one fixed permutation."""
        perm = self.windows.permutation(0)
        for b in range(num_batches):
            first = (b * world_size + rank) * micro_batch_size
            positions = np.arange(first, first + micro_batch_size) % self.windows.num_windows
            yield to_xy(self.windows.stream.windows(perm[positions], self.windows.block_size))


def eval_batches(dataset: Dataset | str | Path, split: str, block_size: int, micro_batch_size: int,
                 num_batches: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One-off evaluation batches (the trainer keeps an EvalWindows across evaluations instead)."""
    return EvalWindows(dataset, split, block_size).batches(micro_batch_size, num_batches, rank, world_size)
