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

from megagpt.chat_data import STATE_VERSION, SampleLoader, SampleShards, eval_positions, resume_position, to_rows
from megagpt.chat_template import ASSISTANT, require_chat_tokens
from megagpt.data import RankSampler, WindowOrder
from megagpt.dataset import DataError, Dataset

SIDES = ("chosen", "rejected")

Completion = tuple[np.ndarray, np.ndarray]  # (ids, mask)


class Pairs(SampleShards):
    """A split's pairs: ((chosen ids, mask), (rejected ids, mask)) by index."""

    kind, reader, noun, sequence, sequences = "preferences", "this stage", "pair", "completion", 2

    def __getitem__(self, i: int) -> tuple[Completion, Completion]:
        k, *rest = (int(v) for v in self.index[i])
        return self._sequence(i, k, *rest[:3]), self._sequence(i, k, *rest[3:])


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


class PairLoader(SampleLoader):
    """Infinite iterator of micro-batches (lists of micro_batch_size pairs) of this rank, in the global order."""

    shards, state_kind = Pairs, "pairs"

    @property
    def pairs(self) -> Pairs:
        return self.samples

    def too_long_advice(self, block_size: int) -> str:
        return (f"pairs have a completion longer than block_size + 1 = {block_size + 1} tokens, cut there (its "
                f"end-of-turn is lost); re-prepare with `megagpt prep preferences --max-length {block_size}` to "
                f"drop them")

    def collate(self, samples: list[tuple[Completion, Completion]]) -> list[tuple[Completion, Completion]]:
        return samples


def eval_pair_batches(pairs: Pairs, micro_batch_size: int, limit: int, rank: int = 0, world_size: int = 1):
    """The split's first min(len, limit) pairs, each once, as fixed micro-batches for this rank, with a weight per
    pair (1, or 0 for the places past the end that keep every rank's batch count equal: ZeRO-3's forward is a
    collective)."""
    for indices, real in eval_positions(len(pairs), micro_batch_size, limit, rank, world_size):
        yield [pairs[i] for i in indices], torch.tensor([float(r) for r in real])


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
