"""The data loader: a dataset dir's shards as exact, resumable, rank-sliced (x, y) batches of token windows.

The order of training windows is a function of (seed, global position) only:
  window w = tokens [w*B, w*B + B + 1) of a split's token stream (all shards end to end), N windows;
  global position p -> epoch p // N, window order(seed, epoch)(p % N), a keyed bijection of [0, N);
  optimizer step s uses positions [s*G, (s+1)*G), G = micro_batch_size * grad_accum_steps * world_size,
  rank r the contiguous slice [s*G + r*G/W, s*G + (r+1)*G/W), as grad_accum_steps micro-batches in order.
So a checkpoint (one global position) resumes exactly, on any world size with the same G.

Start-up reads the manifest and the split's shard table (one small file, read in one go), never the shards
and nothing per shard: a shard's identity (one stat: its size) and member index (a small side file) are checked
the first time this process reads from the shard, and each member's sha256 the first time it is read. Local
shards are memmapped (payloads are contiguous and uncompressed); shards at URLs (a split's `shard_url`:
`pipe:...`, `http://...`) are streamed with webdataset instead (corpus order; see docs/data.md).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megagpt.dataset import DataError, Dataset, ShardInfo, as_dataset, check_shard_file, is_remote, read_index
from megagpt.distributed import warn_once

RESUME_HINT = ("resume with the dataset and settings the checkpoint was trained with, or start a new --run-dir "
               "(--set train.init_from=RUN_DIR keeps its weights)")
STATE_VERSION = 2  # 2: windows ordered by WindowOrder (1 was a stored numpy permutation per epoch)
EVAL_SEED = 0  # eval windows come from a fixed order: the same batches at every evaluation


# ---------------------------------------------------------------- local shards: opened lazily, checked as read


class OpenShard:
    """One local shard, opened from its index: member m is tokens [offset[m], offset[m] + length[m]) of the
    memmapped file. Opening checks the file's size, the index's hash and the recorded largest token id; a
    member's sha256 is checked the first time this process reads it, before any of its tokens is used."""

    def __init__(self, directory: Path, shard: ShardInfo, dtype: np.dtype, vocab_size: int):
        self.path, self.dtype = directory / shard.name, dtype
        check_shard_file(self.path, shard)
        if shard.max_token is None:
            raise DataError(f"{self.path}: the manifest records no max_token; re-run `megagpt prep`")
        if shard.max_token >= vocab_size:
            raise DataError(f"{self.path}: token id {shard.max_token} >= vocab_size {vocab_size}; the shard does "
                            f"not belong to this manifest's tokenizer")
        index = read_index(directory, shard, dtype.name)
        if ((index["offset"] | index["nbytes"]) % dtype.itemsize).any():
            raise DataError(f"{self.path}: its index is not aligned to {dtype.itemsize}-byte tokens; re-run prep")
        self.offset = (index["offset"] // dtype.itemsize).astype(np.int64)
        length = (index["nbytes"] // dtype.itemsize).astype(np.int64)
        self.start = np.concatenate([[0], np.cumsum(length)]).tolist()  # member starts in the shard's stream
        self.digests = index["sha256"]
        self.verified = np.zeros(len(index), dtype=bool)
        self._tokens: np.ndarray | None = None
        self._members: list[np.ndarray | None] = [None] * len(index)  # views of the verified members

    def __getstate__(self):  # DataLoader workers map the file themselves (verified flags travel along)
        return {**self.__dict__, "_tokens": None, "_members": [None] * len(self._members)}

    def member(self, m: int) -> np.ndarray:
        """Member m's tokens, sha256-checked on this process's first read."""
        tokens = self._members[m]
        if tokens is not None:
            return tokens
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r").view(np.ndarray)
        lo = int(self.offset[m])
        tokens = self._tokens[lo:lo + self.start[m + 1] - self.start[m]]
        if not self.verified[m]:
            if hashlib.sha256(tokens).digest() != self.digests[m].tobytes():
                raise DataError(f"{self.path}: sha256 of member {m} does not match its index; the shard is "
                                f"corrupt or was replaced: re-run prep (`megagpt data verify` checks them all)")
            self.verified[m] = True
        self._members[m] = tokens
        return tokens

    def verify_all(self) -> None:
        for m in range(len(self.verified)):
            self.member(m)


def require_tokens(dataset: Dataset) -> None:
    """Packed token windows are read only from a dataset of kind `tokens`: a chat or preferences dataset's shards
    hold other members (a loss mask, two completions) and would be read as garbage or refused with a wrong hint."""
    stages = {"chat": "train.stage: sft", "preferences": "train.stage: reward, dpo or ppo"}
    if dataset.kind != "tokens":
        raise DataError(f"{dataset.dir}: a dataset of kind {dataset.kind!r}; pre-training reads kind 'tokens' "
                        f"(prepare it with `megagpt prep char|sentencepiece`, or train on this one with "
                        f"{stages.get(dataset.kind, 'another train.stage')})")


class TokenStream:
    """A split's tokens (its usable shards end to end), random access by global token offset.

    Building it costs the shard table's token counts (one cumulative sum), nothing per shard file; with
    on_corrupt_shard="skip" every shard is instead read and checked up front, so all ranks agree on the windows.
    """

    def __init__(self, dataset: Dataset, split: str, on_corrupt_shard: str = "error"):
        if on_corrupt_shard not in ("error", "skip"):
            raise ValueError(f"on_corrupt_shard={on_corrupt_shard!r}: expected 'error' or 'skip'")
        require_tokens(dataset)
        self.dir, self.split = dataset.dir, split
        self.dtype = np.dtype(dataset.manifest.token_dtype).newbyteorder("<")
        self.vocab_size = dataset.vocab_size
        self.skipped_shards = 0
        self.table = dataset.shards(split)
        self._open: dict[int, OpenShard] = {}
        self.kept: range | list[int] = range(len(self.table))  # stream shard k is table shard kept[k]
        if on_corrupt_shard == "skip":
            self.kept = self._check_all()
        tokens = self.table.tokens if isinstance(self.kept, range) else self.table.tokens[self.kept]
        self.shard_start = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int64)
        self._starts = self.shard_start.tolist()
        self.num_tokens = int(self.shard_start[-1])

    def _check_all(self) -> list[int]:
        """Open and verify every shard; the ones that pass (a bad one is a warning, and counted)."""
        kept = []
        for k in range(len(self.table)):
            try:
                opened = OpenShard(self.dir, self.table[k], self.dtype, self.vocab_size)
                opened.verify_all()
            except DataError as e:
                warn_once(f"skipping shard: {e}")
                self.skipped_shards += 1
                continue
            self._open[len(kept)] = opened
            kept.append(k)
        return kept

    def _shard(self, k: int) -> OpenShard:
        if k not in self._open:
            self._open[k] = OpenShard(self.dir, self.table[self.kept[k]], self.dtype, self.vocab_size)
        return self._open[k]

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Tokens [start, start+length) into out, across member and shard boundaries."""
        done = 0
        k = bisect_right(self._starts, start) - 1
        while done < length:
            shard, pos = self._shard(k), start + done - self._starts[k]
            while done < length and pos < self._starts[k + 1] - self._starts[k]:
                m = bisect_right(shard.start, pos) - 1
                lo = pos - shard.start[m]
                take = min(length - done, shard.start[m + 1] - shard.start[m] - lo)
                out[done:done + take] = shard.member(m)[lo:lo + take]
                done, pos = done + take, pos + take
            k += 1

    def windows(self, window_ids: np.ndarray, block_size: int) -> np.ndarray:
        """Tokens [w*B, w*B+B+1) of each window w as rows (n, B+1), in the shards' compact dtype."""
        span = block_size + 1
        buf = np.empty((len(window_ids), span), dtype=self.dtype)
        for i, window in enumerate(np.asarray(window_ids, dtype=np.int64).tolist()):
            start = window * block_size
            k = bisect_right(self._starts, start) - 1
            shard = self._open.get(k) or self._shard(k)
            pos = start - self._starts[k]
            m = bisect_right(shard.start, pos) - 1
            lo = pos - shard.start[m]
            if lo + span <= shard.start[m + 1] - shard.start[m]:  # the common case: inside one member
                buf[i] = shard.member(m)[lo:lo + span]
            else:
                self.read(start, span, buf[i])
        return buf


# ---------------------------------------------------------------- the global window order


_U64 = np.uint64
_MIX1, _MIX2, _XORSHIFT = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB), _U64(29)


def _round(v: np.ndarray, key: np.uint64, out_shift: np.uint64) -> np.ndarray:
    """The Feistel round function: multiply, xorshift, multiply (splitmix64's constants), then the top bits,
    which depend on every input bit."""
    z = (v ^ key) * _MIX1
    z ^= z >> _XORSHIFT
    z *= _MIX2
    return z >> out_shift


class WindowOrder:
    """A keyed bijection of [0, N) per (seed, epoch): an alternating Feistel network over the ceil(log2 N) bits
    of an index, cycle-walking until the result is < N (fewer than 2 passes on average, as 2**bits < 2N).

    O(1) memory and time per position whatever N: nothing is materialised per epoch, so start-up and resume
    cost the same at a thousand and a trillion windows, and every process and worker computes the same order.
    Each round is invertible (one half XORed with a keyed multiply-xorshift hash of the other), so every window
    comes exactly once per epoch; 8 rounds with 64-bit round keys from SeedSequence([seed, epoch]) mix well
    (tests/test_data_scale.py compares it with numpy's random permutation).
    """

    ROUNDS = 8
    BLOCK = 1024  # positions are computed in aligned blocks, the last two kept (16 KB): one call per 16 batches

    def __init__(self, num_windows: int, seed: int):
        if num_windows < 1:
            raise ValueError(f"num_windows={num_windows}: need at least one")
        self.num_windows, self.seed = num_windows, seed
        bits = max(1, (num_windows - 1).bit_length())
        self.lo_bits, self.hi_bits = bits // 2, bits - bits // 2  # hi_bits >= 1; lo_bits may be 0 (N <= 2)
        self.lo_mask = _U64((1 << self.lo_bits) - 1)
        self._keys: dict[int, np.ndarray] = {}
        self._blocks: dict[int, np.ndarray] = {}

    def _round_keys(self, epoch: int) -> np.ndarray:
        if epoch not in self._keys:
            if len(self._keys) >= 4:
                self._keys.pop(next(iter(self._keys)))
            self._keys[epoch] = np.random.SeedSequence([self.seed, epoch]).generate_state(self.ROUNDS, np.uint64)
        return self._keys[epoch]

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        shift = _U64(self.lo_bits)
        hi, lo = x >> shift, x & self.lo_mask
        to_hi, to_lo = _U64(64 - self.hi_bits), _U64(64 - self.lo_bits)
        for r, key in enumerate(keys):
            if r % 2 == 0:
                hi ^= _round(lo, key, to_hi)
            elif self.lo_bits:
                lo ^= _round(hi, key, to_lo)
        return (hi << shift) | lo

    def permute(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        """order(seed, epoch) of each offset in [0, N)."""
        keys = self._round_keys(epoch)
        out = self._feistel(np.asarray(offsets, dtype=np.uint64), keys)
        todo = np.flatnonzero(out >= self.num_windows)
        while todo.size:  # cycle walking: a bijection of [0, 2**bits) restricted to [0, N) stays one
            out[todo] = self._feistel(out[todo], keys)
            todo = todo[out[todo] >= self.num_windows]
        return out.astype(np.int64)

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> window ids: position p is window order(seed, p // N)(p % N)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not positions.size:
            return positions.copy()
        first, last = int(positions.min()) // self.BLOCK, int(positions.max()) // self.BLOCK
        if last - first > 1:  # scattered positions: computed as they are
            return self._ids(positions)
        table = np.concatenate([self._block(b) for b in range(first, last + 1)])
        return table[positions - first * self.BLOCK]

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            if len(self._blocks) >= 2:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[b] = self._ids(np.arange(b * self.BLOCK, (b + 1) * self.BLOCK, dtype=np.int64))
        return self._blocks[b]

    def _ids(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.num_windows)
        if positions.size and epochs[0] == epochs[-1] and (epochs == epochs[0]).all():
            return self.permute(int(epochs[0]), offsets)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permute(int(epoch), offsets[sel])
        return out


class WindowDataset(torch.utils.data.Dataset):
    """Map-style over global positions: position p -> window order(seed, p // N)(p % N) of the stream."""

    def __init__(self, stream: TokenStream, block_size: int, seed: int):
        self.stream, self.block_size, self.seed = stream, block_size, seed
        self.num_windows = (stream.num_tokens - 1) // block_size
        if self.num_windows < 1:
            raise DataError(f"{stream.dir}: split {stream.split} has {stream.num_tokens} usable tokens, fewer than "
                            f"block_size+1 = {block_size + 1}; use a smaller block_size or more data")
        self.order = WindowOrder(self.num_windows, seed)

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        return self.order.window_ids(positions)

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
        require_tokens(dataset)
        self.block_size, self.vocab_size = block_size, dataset.vocab_size
        self.dtype = np.dtype(dataset.manifest.token_dtype).newbyteorder("<")
        table = dataset.shards(split)
        names = [table.name(k) for k in range(len(table))]
        self.urls = [name if is_remote(name) else str(dataset.dir / name) for name in names]
        self.starts = np.concatenate([[0], np.cumsum(table.tokens)]).astype(np.int64)
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
        if seen != self.starts[k + 1] - self.starts[k]:
            raise DataError(f"{url}: truncated or corrupt shard ({seen} tokens, the shard table says "
                            f"{self.starts[k + 1] - self.starts[k]})")

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
        self.streaming = dataset.shards("train").remote
        if self.streaming:
            asked = {"num_workers": (num_workers, 0), "on_corrupt_shard": (on_corrupt_shard, "error")}
            ignored = [f"{key}={value!r}" for key, (value, default) in asked.items() if value != default]
            if ignored:  # said, not silently dropped: a "skip" run would still stop at a damaged shard
                warn_once(f"{', '.join(ignored)} ignored: the train split is streamed from its shard_url "
                          f"(no DataLoader workers, no skipping; docs/data.md, streaming mode)")
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
            raise DataError(f"loader state format {state.get('format_version')!r}, expected {STATE_VERSION}: "
                            f"saved by a megagpt with another window order, so it cannot resume exactly; "
                            f"start a new --run-dir (or --resume never)")
        for key, mine in (("seed", self.seed), ("block_size", self.block_size),
                          ("num_windows", self.num_windows)):
            if state[key] != mine:
                raise DataError(f"cannot resume the data order: saved {key}={state[key]}, now {mine}; {RESUME_HINT}")
        consumed, micro = state["windows_consumed"], state["micro_batches_into_step"]
        if consumed % self.global_batch or (micro and state["global_batch_windows"] != self.global_batch) or (
                micro and state["world_size"] != self.world_size):
            raise DataError(f"cannot resume exactly: {consumed} windows consumed (+{micro} micro-batches) "
                            f"with a global batch of {state['global_batch_windows']}, "
                            f"now {self.global_batch}")
        self.step, self.micro = consumed // self.global_batch, micro
        self._batches = None


class EvalWindows:
    """A split's fixed evaluation windows: the same batches at every call (the order of seed EVAL_SEED; corpus order
    for a split at URLs, streamed from its start at each call). on_corrupt_shard as for TrainLoader: "skip" checks
    the split's local shards now and leaves the bad ones out."""

    def __init__(self, dataset: Dataset | str | Path, split: str, block_size: int, on_corrupt_shard: str = "error"):
        dataset = as_dataset(dataset)
        if dataset.shards(split).remote:
            self.windows = StreamingWindows(dataset, split, block_size)
        else:
            self.windows = WindowDataset(TokenStream(dataset, split, on_corrupt_shard), block_size, EVAL_SEED)

    def batches(self, micro_batch_size: int, num_batches: int, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """num_batches (x, y) for this rank; ranks take interleaved slices of one fixed order."""
        positions = [list(range(first, first + micro_batch_size))
                     for first in ((b * world_size + rank) * micro_batch_size for b in range(num_batches))]
        if isinstance(self.windows, StreamingWindows):  # position p is window p % N, as for training
            rows = self.windows.batches(positions, micro_batch_size * world_size)
        else:
            rows = (self.windows.__getitems__(np.array(p) % self.windows.num_windows) for p in positions)
        for batch in rows:
            yield to_xy(batch)


def eval_batches(dataset: Dataset | str | Path, split: str, block_size: int, micro_batch_size: int,
                 num_batches: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One-off evaluation batches (the trainer keeps an EvalWindows across evaluations instead)."""
    return EvalWindows(dataset, split, block_size).batches(micro_batch_size, num_batches, rank, world_size)
