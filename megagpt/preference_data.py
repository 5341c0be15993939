"""Preference data for the alignment stages: a `preferences` dataset's pairs as exact, resumable, rank-sliced
micro-batches (reward, dpo), and the prompts of a preferences or chat dataset (ppo's rollouts).

A pair is (chosen, rejected), each (ids, mask) as data_prep/preferences.py wrote it: the prompt, then the reply
and its end-of-turn token, the mask 1 exactly on the reply. A micro-batch of B pairs is one tensor of 2B rows,
the B chosen completions first, then the B rejected ones (one forward pass for both):
  * `pair_rows`: x, y as the chat loader builds them (y = -1 off the mask and on padding): per-token log-probs
    of the replies, for DPO;
  * `score_rows`: the completions themselves, right-padded, and the index of each one's last token (its
    end-of-turn): where a reward model's score is read.
The order is the chat loader's (megagpt/chat_data.py): global position p -> pair WindowOrder(seed, p // N)(p % N),
step s takes positions [s*G, (s+1)*G), rank r its slice (RankSampler); so a checkpoint resumes exactly and 2 ranks
see the micro-batches that 1 rank with twice the accumulation sees.
"""

from __future__ import annotations

import numpy as np
import torch

from megagpt.chat_data import _index_shard, to_rows
from megagpt.chat_template import ASSISTANT, require_chat_tokens
from megagpt.data import RankSampler, WindowOrder
from megagpt.dataset import DataError, Dataset, sha256_file
from megagpt.distributed import warn_once

STATE_VERSION = 1
SIDES = ("chosen", "rejected")

Completion = tuple[np.ndarray, np.ndarray]  # (ids, mask)


class Pairs:
    """A split's pairs: ((chosen ids, mask), (rejected ids, mask)) by index (shards checked once, memmapped)."""

    def __init__(self, dataset: Dataset, split: str):
        if dataset.kind != "preferences":
            raise DataError(f"{dataset.dir}: a dataset of kind {dataset.kind!r}; this stage reads kind "
                            f"'preferences' (prepare it with `megagpt prep preferences`)")
        self.dir, self.vocab_size = dataset.dir, dataset.vocab_size
        self.dtype = np.dtype(dataset.manifest.token_dtype).newbyteorder("<")
        self.files, index = [], []
        for k, shard in enumerate(dataset.shards(split)):
            path = dataset.dir / shard.name
            samples = _index_shard(path, self.dtype.itemsize)  # (token offset, count, mask offset) per completion
            if len(samples) != 2 * shard.samples or sum(n for _, n, _ in samples) != shard.tokens:
                raise DataError(f"{path}: {len(samples)} completions / {sum(n for _, n, _ in samples)} tokens, the "
                                f"manifest says {shard.samples} pairs / {shard.tokens} tokens: re-run `megagpt prep "
                                f"preferences`")
            digest = sha256_file(path)
            if digest != shard.sha256:
                raise DataError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                                f"{shard.sha256[:12]}...; the shard is corrupt or was replaced: re-run prep")
            self.files.append(np.memmap(path, dtype=np.uint8, mode="r"))
            index += [(k, *chosen, *rejected) for chosen, rejected in zip(samples[::2], samples[1::2], strict=True)]
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 7)

    def __len__(self) -> int:
        return len(self.index)

    def _completion(self, i: int, k: int, offset: int, n: int, mask_offset: int) -> Completion:
        data = self.files[k]
        ids = data[offset:offset + n * self.dtype.itemsize].view(self.dtype)
        if n and int(ids.max()) >= self.vocab_size:
            raise DataError(f"{self.dir}: token id {int(ids.max())} >= vocab_size {self.vocab_size} in pair {i}; "
                            f"the shard does not belong to this manifest's tokenizer")
        return ids, data[mask_offset:mask_offset + n]

    def __getitem__(self, i: int) -> tuple[Completion, Completion]:
        k, *rest = (int(v) for v in self.index[i])
        return self._completion(i, k, *rest[:3]), self._completion(i, k, *rest[3:])


# ---------------------------------------------------------------- micro-batches of pairs


def pair_rows(pairs: list[tuple[Completion, Completion]], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (2B, T) int64: the chosen completions' rows, then the rejected ones'; y = -1 off the reply."""
    return to_rows([c for c, _ in pairs] + [r for _, r in pairs], block_size)


def score_rows(pairs: list[tuple[Completion, Completion]], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (2B, T <= block_size) right-padded with 0, and each row's last token index (its end-of-turn)."""
    completions = [c for c, _ in pairs] + [r for _, r in pairs]
    return completion_rows([ids[:block_size].astype(np.int64) for ids, _ in completions])


def completion_rows(sequences: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences -> (ids right-padded with 0 to the longest, index of each one's last token)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return ids, torch.tensor([len(s) - 1 for s in sequences], dtype=torch.long)


class PairLoader:
    """Infinite iterator of micro-batches (lists of micro_batch_size pairs) of this rank, in the global order."""

    def __init__(self, dataset: Dataset, block_size: int, micro_batch_size: int, grad_accum_steps: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 1337):
        self.pairs = Pairs(dataset, "train")
        if len(self.pairs) == 0:
            raise DataError(f"{dataset.dir}: the train split holds no pairs")
        self.seed, self.micro_batch_size, self.grad_accum_steps = seed, micro_batch_size, grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.order = WindowOrder(len(self.pairs), seed)
        self.step, self.micro = 0, 0
        self._positions = None
        lengths = np.maximum(self.pairs.index[:, 2], self.pairs.index[:, 5])
        too_long = int((lengths > block_size + 1).sum())
        if too_long:
            warn_once(f"{dataset.dir}: {too_long} of {len(self.pairs)} pairs have a completion longer than "
                      f"block_size + 1 = {block_size + 1} tokens, cut there (its end-of-turn is lost); re-prepare "
                      f"with `megagpt prep preferences --max-length {block_size}` to drop them")

    def __iter__(self):
        return self

    def __next__(self) -> list[tuple[Completion, Completion]]:
        if self._positions is None:
            self._positions = iter(RankSampler(self.micro_batch_size, self.grad_accum_steps, self.rank,
                                               self.world_size, self.step, self.micro))
        indices = self.order.window_ids(np.asarray(next(self._positions)))
        batch = [self.pairs[int(i)] for i in indices]
        self.micro += 1
        if self.micro == self.grad_accum_steps:
            self.step, self.micro = self.step + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"format_version": STATE_VERSION, "kind": "pairs", "seed": self.seed,
                "samples_consumed": self.step * self.global_batch, "micro_batches_into_step": self.micro,
                "global_batch_samples": self.global_batch, "num_samples": len(self.pairs),
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = resume_position(state, "pairs", self.seed, len(self.pairs), self.global_batch,
                                                self.world_size)
        self._positions = None


def resume_position(state: dict, kind: str, seed: int, num_samples: int, global_batch: int,
                    world_size: int) -> tuple[int, int]:
    """(step, micro) to continue a saved sequence; the world size may change when the global batch does not."""
    if state.get("format_version") != STATE_VERSION or state.get("kind") != kind:
        raise DataError(f"data loader state {state.get('kind')!r} v{state.get('format_version')!r} is not this "
                        f"stage's ({kind!r} v{STATE_VERSION}): was the checkpoint written by another stage?")
    for key, mine in (("seed", seed), ("num_samples", num_samples)):
        if state[key] != mine:
            raise DataError(f"cannot resume the data order: saved {key}={state[key]}, now {mine}")
    consumed, micro = state["samples_consumed"], state["micro_batches_into_step"]
    if consumed % global_batch or (micro and (state["global_batch_samples"] != global_batch
                                              or state["world_size"] != world_size)):
        raise DataError(f"cannot resume exactly: {consumed} samples consumed (+{micro} micro-batches) with a "
                        f"global batch of {state['global_batch_samples']}, now {global_batch}")
    return consumed // global_batch, micro


def eval_pair_batches(pairs: Pairs, micro_batch_size: int, limit: int, rank: int = 0, world_size: int = 1):
    """The split's first min(len, limit) pairs, each once, as fixed micro-batches for this rank, with a weight per
    pair (1, or 0 for the places past the end that keep every rank's batch count equal: ZeRO-3's forward is a
    collective)."""
    n = len(pairs)
    count = min(n, limit)
    per_batch = micro_batch_size * world_size
    for b in range(-(-count // per_batch)):
        first = (b * world_size + rank) * micro_batch_size
        positions = range(first, first + micro_batch_size)
        yield [pairs[p % n] for p in positions], torch.tensor([float(p < count) for p in positions])


# ---------------------------------------------------------------- prompts (ppo)


class Prompts:
    """A split's prompts as token ids ending with <|assistant|>: the model's reply comes next.

    From a `preferences` dataset, a pair's prompt (its chosen completion up to the reply); from a `chat` dataset,
    a conversation up to its first assistant turn. Prompts longer than max_length are cut from the left (the
    latest words and <|assistant|> stay)."""

    def __init__(self, dataset: Dataset, split: str, max_length: int):
        self.assistant = require_chat_tokens(dataset.tokenizer)[ASSISTANT]
        if dataset.kind == "preferences":
            pairs = Pairs(dataset, split)
            self._get = lambda i: self._prompt_of_pair(pairs[i][0])
            self._len = len(pairs)
        elif dataset.kind == "chat":
            from megagpt.chat_data import Conversations

            conversations = Conversations(dataset, split)
            self._get = lambda i: self._prompt_of_conversation(conversations[i][0])
            self._len = len(conversations)
        else:
            raise DataError(f"{dataset.dir}: a dataset of kind {dataset.kind!r}; ppo reads its prompts from a "
                            f"'preferences' or 'chat' dataset")
        self.max_length = max_length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> list[int]:
        return self._get(i)[-self.max_length:]

    @staticmethod
    def _prompt_of_pair(completion: Completion) -> list[int]:
        ids, mask = completion
        return ids[:int(np.argmax(mask))].astype(np.int64).tolist()

    def _prompt_of_conversation(self, ids: np.ndarray) -> list[int]:
        ids = ids.astype(np.int64).tolist()
        return ids[:ids.index(self.assistant) + 1]


class PromptSchedule:
    """Which prompts each PPO step's rollout holds, world-size independent and resumable.

    A step's rollout is `minibatches` global mini-batches of G = micro_batch_size x grad_accum_steps x world_size
    prompts; mini-batch j of step s is global batch number s * minibatches + j of the chat loader's schedule
    (RankSampler), so rank r generates exactly the prompts it later trains on, and 2 ranks hold what 1 rank with
    twice the accumulation holds. Each prompt is named by its global position (a seed for its sampling)."""

    def __init__(self, num_prompts: int, micro_batch_size: int, grad_accum_steps: int, minibatches: int,
                 rank: int, world_size: int, seed: int):
        self.order = WindowOrder(num_prompts, seed)
        self.num_prompts, self.seed = num_prompts, seed
        self.micro_batch_size, self.grad_accum_steps, self.minibatches = micro_batch_size, grad_accum_steps, minibatches
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size

    def step_positions(self, step: int) -> list[list[list[int]]]:
        """[mini-batch][micro-batch] -> this rank's global positions."""
        out = []
        for j in range(self.minibatches):
            sampler = iter(RankSampler(self.micro_batch_size, self.grad_accum_steps, self.rank, self.world_size,
                                       step * self.minibatches + j, 0))
            out.append([next(sampler) for _ in range(self.grad_accum_steps)])
        return out

    def prompt_index(self, position: int) -> int:
        return int(self.order.window_ids(np.asarray([position]))[0])

    def state_dict(self, step: int) -> dict:
        return {"format_version": STATE_VERSION, "kind": "prompts", "seed": self.seed,
                "samples_consumed": step * self.minibatches * self.global_batch, "micro_batches_into_step": 0,
                "global_batch_samples": self.global_batch * self.minibatches, "num_samples": self.num_prompts,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> int:
        """The PPO step to continue from."""
        step, _ = resume_position(state, "prompts", self.seed, self.num_prompts,
                                  self.global_batch * self.minibatches, self.world_size)
        return step
