"""Supervised fine-tuning: next-token loss on the assistant's tokens of conversations (a dataset of kind `chat`).

The document completer becomes a question answerer: the same GPT and the same loop as pre-training, but each
row is one conversation and only the positions whose target the loss mask marks (the assistant's content and
its end-of-turn token) count; the user's and system's tokens are context, never targets. Usually started from a
pre-trained model with `train.init_from` (megagpt/init_from.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megagpt.chat_data import ChatLoader, Conversations, eval_batches
from megagpt.chat_template import ASSISTANT, END, render, require_chat_tokens
from megagpt.config import Config
from megagpt.dataset import Dataset
from megagpt.distributed import DistInfo, mean_over_ranks
from megagpt.stages import LossStage


def masked_loss_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropies over targets != -1, their count): the loss ignores every other position."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                            reduction="sum")
    return total, (targets != -1).sum()


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over the assistant's targets (0, with zero gradients, when there are none)."""
    total, count = masked_loss_terms(logits, targets)
    return total / count.clamp(min=1)


class SFTStage(LossStage):
    next_step = "talk to it: megagpt chat {run_dir}"
    prepare_data = ("`megagpt prep chat --input CHATS.jsonl --tokenizer BASE_RUN --out {dir}` (or `megagpt prep "
                    "shakespeare-qa --out {dir}` for the Shakespeare questions)")

    def __init__(self, cfg: Config, dataset: Dataset, dist: DistInfo, device: torch.device,
                 grad_accum_steps: int):
        super().__init__(cfg, dataset, dist, device, grad_accum_steps)
        self.loader = ChatLoader(dataset, cfg.model.block_size, cfg.train.micro_batch_size, grad_accum_steps,
                                 dist.rank, dist.world_size, seed=cfg.train.seed)  # first: refuses kind tokens
        self.special = require_chat_tokens(dataset.tokenizer)
        self._val: Conversations | None = None  # indexed at the first evaluation, then kept

    def loss(self, engine, batch) -> torch.Tensor:
        x, y = batch
        logits, _ = engine(x)
        return masked_loss(logits, y)

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """The loss per assistant token over the first eval_steps x micro_batch x world val conversations."""
        if self._val is None:
            self._val = Conversations(self.dataset, "val")
        if len(self._val) == 0:
            return {}
        limit = self.cfg.train.eval_steps * self.cfg.train.micro_batch_size * self.dist.world_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        engine.eval()
        for x, y in eval_batches(self._val, self.cfg.train.micro_batch_size, limit, self.dist.rank,
                                 self.dist.world_size, self.cfg.model.block_size):
            total, count = masked_loss_terms(engine(x.to(self.device))[0], y.to(self.device))
            sums += torch.stack([total.double(), count.double()])
        engine.train()
        total, count = mean_over_ranks(sums).tolist()  # a ratio of means is the ratio of sums
        return {"val_loss": total / max(count, 1.0), "val_assistant_tokens": count * self.dist.world_size}

    def sample(self, engine, step: int) -> str | None:
        """The model's reply to the first conversation's first question, as a conversation, with the reference."""
        from megagpt.chat import generate_reply

        if self.cfg.train.sample_tokens == 0:
            return None
        conversations = self._val if self._val is not None and len(self._val) else self.loader.conversations
        ids, mask = (t.astype("int64") for t in conversations[0])
        prompt_end = int(list(ids).index(self.special[ASSISTANT])) + 1
        answer = [int(i) for i, m in zip(ids[prompt_end:], mask[prompt_end:], strict=True) if m]
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + step)
        reply = generate_reply(engine.module, ids[:prompt_end].tolist(), self.special[END],
                               self.cfg.train.sample_tokens, temperature=0.8, top_k=200, generator=generator)
        engine.module.train()
        tokenizer = self.dataset.tokenizer
        text = render(tokenizer, [*ids[:prompt_end], *reply.ids, *([self.special[END]] * reply.stopped)])
        unfinished = "" if reply.stopped else " [no end-of-turn]"
        return f"{text.rstrip()}{unfinished}\n(reference) {tokenizer.decode(answer)}\n"

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])  # global positions: valid on any world size
