"""The chat data loader, and the per-sample shard reading and loader order the preference loader shares.

ChatLoader: a `chat` dataset's conversations as exact, resumable, rank-sliced (x, y) batches. One conversation per
row, never two: a row is a conversation's tokens, then padding up to the longest row of its micro-batch (at most
block_size). Attention is causal, so a token sees only its own conversation's earlier tokens: the padding after it
is invisible to it and nothing crosses rows (tests/test_sft.py checks the logits). Targets are -1 (ignored by the
loss) wherever the loss mask is 0 and on the padding: y[t] = tokens[t+1] where mask[t+1] is 1. A conversation longer
than block_size + 1 is cut there (prep's --max-length avoids that).

The order (SampleLoader, megagpt/preference_data.py's too) is the pre-training loader's (megagpt/data.py), with a
sample in the place of a window: global position p -> sample order(seed, p // N)(p % N) (data.py's WindowOrder);
step s uses positions [s*G, (s+1)*G), G = micro_batch_size * grad_accum_steps * world_size, and rank r its
contiguous slice (RankSampler). So a checkpoint resumes exactly, and 2 ranks see the micro-batches that 1 rank with
twice the accumulation sees.

Shards (SampleShards): each sample holds `<key>.tokens` (little-endian ids in the manifest's token_dtype) and
`<key>.mask` (one uint8 per token), a pair `<key>.chosen.*` and `<key>.rejected.*`, as data_prep/sample_dataset.py
writes them; read by random access (members indexed once, the file np.memmap'ed), each shard's sha256 checked
against the manifest when it is opened.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch

from megagpt.data import RESUME_HINT, RankSampler, WindowOrder
from megagpt.dataset import DataError, Dataset, sha256_file
from megagpt.distributed import warn_once

STATE_VERSION = 1
TOKENS, MASK = "tokens", "mask"  # the two members of a sequence


class SampleShards:
    """A split's samples of a per-sample dataset, from its shards (checked once against the manifest, memmapped).

    `index` holds per sample its shard, then per sequence (one in a conversation, two in a pair) its token byte
    offset, token count and mask byte offset; `lengths`, each sample's longest sequence."""

    kind: str  # the dataset kind read
    reader: str  # who reads it, for the wrong-kind error
    noun: str  # one sample, for errors
    sequence: str  # one sequence, for errors
    sequences: int  # per sample

    def __init__(self, dataset: Dataset, split: str):
        if dataset.kind != self.kind:
            raise DataError(f"{dataset.dir}: a dataset of kind {dataset.kind!r}; {self.reader} reads kind "
                            f"{self.kind!r} (prepare it with `megagpt prep {self.kind}`)")
        self.dir, self.vocab_size = dataset.dir, dataset.vocab_size
        self.dtype = np.dtype(dataset.manifest.token_dtype).newbyteorder("<")
        self.files, index, m = [], [], self.sequences
        for k, shard in enumerate(dataset.shards(split)):
            sequences = self._open(dataset.dir / shard.name, shard)
            index += [(k, *(v for seq in sequences[j:j + m] for v in seq)) for j in range(0, len(sequences), m)]
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 1 + 3 * m)
        self.lengths = self.index[:, 2::3].max(axis=1)

    def _open(self, path: Path, shard) -> list[tuple[int, int, int]]:
        """The shard's sequences (checked against its manifest entry), its file memmapped into self.files."""
        sequences = _index_shard(path, self.dtype.itemsize)
        tokens = sum(n for _, n, _ in sequences)
        if len(sequences) != self.sequences * shard.samples or tokens != shard.tokens:
            raise DataError(f"{path}: {len(sequences)} {self.sequence}s / {tokens} tokens, the manifest says "
                            f"{shard.samples} {self.noun}s / {shard.tokens} tokens: re-run `megagpt prep {self.kind}`")
        digest = sha256_file(path)
        if digest != shard.sha256:
            raise DataError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                            f"{shard.sha256[:12]}...; the shard is corrupt or was replaced: re-run prep")
        self.files.append(np.memmap(path, dtype=np.uint8, mode="r"))
        return sequences

    def __len__(self) -> int:
        return len(self.index)

    def _sequence(self, i: int, k: int, offset: int, n: int, mask_offset: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of a sequence of sample i, at offset in shard k."""
        data = self.files[k]
        ids = data[offset:offset + n * self.dtype.itemsize].view(self.dtype)
        if n and int(ids.max()) >= self.vocab_size:
            raise DataError(f"{self.dir}: token id {int(ids.max())} >= vocab_size {self.vocab_size} in "
                            f"{self.noun} {i}; the shard does not belong to this manifest's tokenizer")
        return ids, data[mask_offset:mask_offset + n]


class Conversations(SampleShards):
    """A split's conversations: (ids, mask) by index."""

    kind, reader, noun, sequence, sequences = "chat", "the sft stage", "conversation", "conversation", 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._sequence(i, *(int(v) for v in self.index[i]))


def _index_shard(path: Path, itemsize: int) -> list[tuple[int, int, int]]:
    """(token byte offset, token count, mask byte offset) per sample, in the tar's order."""
    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _, field = info.name.rpartition(".")
                members.setdefault(key, {})[field] = info
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: truncated or corrupt shard ({e})") from None
    out = []
    for key, fields in members.items():
        if set(fields) != {TOKENS, MASK} or fields[TOKENS].size != fields[MASK].size * itemsize:
            raise DataError(f"{path}: sample {key} is not a conversation ({'/'.join(sorted(fields))}); expected "
                            f"{TOKENS} and {MASK} of matching length")
        out.append((fields[TOKENS].offset_data, fields[MASK].size, fields[MASK].offset_data))
    return out


def to_rows(samples: list[tuple[np.ndarray, np.ndarray]], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations -> x, y (n, T) int64, T = the longest (cut to block_size + 1) minus one; y = -1 off-mask."""
    span = min(max(len(ids) for ids, _ in samples), block_size + 1)
    x = np.zeros((len(samples), span - 1), dtype=np.int64)
    y = np.full((len(samples), span - 1), -1, dtype=np.int64)
    for row, (ids, mask) in enumerate(samples):
        ids, mask = ids[:span].astype(np.int64), mask[:span].astype(bool)
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = np.where(mask[1:], ids[1:], -1)
    return torch.from_numpy(x), torch.from_numpy(y)


class SampleLoader:
    """Infinite iterator of this rank's micro-batches of the train split's samples, in the global order
    (RankSampler over WindowOrder positions), exactly resumable; a subclass says what it reads (`shards`), what a
    micro-batch is (`collate`) and what to do about samples longer than block_size + 1 (`too_long_advice`)."""

    shards: type[SampleShards]
    state_kind: str | None = None  # the "kind" its state names (None: the chat loader's, which names none)

    def __init__(self, dataset: Dataset, block_size: int, micro_batch_size: int, grad_accum_steps: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 1337):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.samples = self.shards(dataset, "train")
        if len(self.samples) == 0:
            raise DataError(f"{dataset.dir}: the train split holds no {self.samples.noun}s")
        self.block_size, self.seed = block_size, seed
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.order = WindowOrder(len(self.samples), seed)  # the pre-training loader's shuffle
        self.step, self.micro = 0, 0
        self._positions = None
        too_long = int((self.samples.lengths > block_size + 1).sum())
        if too_long:
            warn_once(f"{dataset.dir}: {too_long} of {len(self.samples)} {self.too_long_advice(block_size)}")

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def too_long_advice(self, block_size: int) -> str:
        raise NotImplementedError

    def collate(self, samples: list):
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        if self._positions is None:
            self._positions = iter(RankSampler(self.micro_batch_size, self.grad_accum_steps, self.rank,
                                               self.world_size, self.step, self.micro))
        indices = self.order.window_ids(np.asarray(next(self._positions)))
        batch = self.collate([self.samples[int(i)] for i in indices])
        self.micro += 1
        if self.micro == self.grad_accum_steps:
            self.step, self.micro = self.step + 1, 0
        return batch

    def state_dict(self) -> dict:
        kind = {} if self.state_kind is None else {"kind": self.state_kind}
        return {"format_version": STATE_VERSION, **kind, "seed": self.seed,
                "samples_consumed": self.step * self.global_batch, "micro_batches_into_step": self.micro,
                "global_batch_samples": self.global_batch, "num_samples": self.num_samples,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue the same global sequence; the world size may change when G (the global batch) does not."""
        self.step, self.micro = resume_position(state, self.state_kind, self.seed, self.num_samples,
                                                self.global_batch, self.world_size)
        self._positions = None


def resume_position(state: dict, kind: str | None, seed: int, num_samples: int, global_batch: int,
                    world_size: int) -> tuple[int, int]:
    """(step, micro) to continue a saved sequence; the world size may change when the global batch does not.

    kind: the "kind" the state must name; None for the chat loader's state, which names none."""
    if (state.get("format_version") != STATE_VERSION or state.get("kind") != kind
            or "samples_consumed" not in state):
        raise DataError(f"data loader state (kind {state.get('kind')!r}, version {state.get('format_version')!r}) "
                        f"is not this stage's (kind {kind!r}, version {STATE_VERSION}): was the checkpoint written "
                        f"by another stage?")
    for key, mine in (("seed", seed), ("num_samples", num_samples)):
        if state[key] != mine:
            raise DataError(f"cannot resume the data order: saved {key}={state[key]}, now {mine}; {RESUME_HINT}")
    consumed, micro = state["samples_consumed"], state["micro_batches_into_step"]
    if consumed % global_batch or (micro and (state["global_batch_samples"] != global_batch
                                              or state["world_size"] != world_size)):
        raise DataError(f"cannot resume exactly: {consumed} samples consumed (+{micro} micro-batches) with a "
                        f"global batch of {state['global_batch_samples']}, now {global_batch}")
    return consumed // global_batch, micro


class ChatLoader(SampleLoader):
    """Infinite iterator of (x, y) torch.long CPU tensors (micro_batch_size, T <= block_size) for this rank."""

    shards = Conversations

    @property
    def conversations(self) -> Conversations:
        return self.samples

    def too_long_advice(self, block_size: int) -> str:
        return (f"conversations are longer than block_size + 1 = {block_size + 1} tokens and are cut there; "
                f"re-prepare with `megagpt prep chat --max-length {block_size + 1}` to cut them at turn boundaries")

    def collate(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        return to_rows(samples, self.block_size)

    def state_dict(self) -> dict:
        state = super().state_dict()
        return {**state, "epoch": state["samples_consumed"] // self.num_samples}


def eval_batches(conversations: Conversations, micro_batch_size: int, limit: int, rank: int = 0,
                 world_size: int = 1, block_size: int = 1 << 30):
    """The split's first min(len, limit) conversations, each once, as fixed micro-batches for this rank (ranks
    interleaved, the same at every evaluation). Every rank gets the same number of batches (ZeRO-3's forward is
    a collective); places past the end hold a conversation with every target -1, which weighs nothing."""
    for indices, real in eval_positions(len(conversations), micro_batch_size, limit, rank, world_size):
        x, y = to_rows([conversations[i] for i in indices], block_size)
        y[[not r for r in real]] = -1
        yield x, y


def eval_positions(n: int, micro_batch_size: int, limit: int, rank: int, world_size: int):
    """The first min(n, limit) samples of a split, each once, as this rank's fixed micro-batches (ranks
    interleaved); every rank gets as many as the first rank. Per micro-batch: (sample indices, which of them are
    real: the places past the end repeat earlier samples and must weigh nothing)."""
    count = min(n, limit)
    per_batch = micro_batch_size * world_size
    for b in range(-(-count // per_batch)):
        first = (b * world_size + rank) * micro_batch_size
        positions = range(first, first + micro_batch_size)
        yield [p % n for p in positions], [p < count for p in positions]
