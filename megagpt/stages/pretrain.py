"""Pre-training: next-token loss on packed token windows (a dataset of kind `tokens`); a document completer."""

from __future__ import annotations

from typing import Any

import torch

from megagpt.config import Config
from megagpt.data import EvalWindows, TrainLoader
from megagpt.dataset import Dataset
from megagpt.distributed import DistInfo, mean_over_ranks
from megagpt.generate import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, generate, prompt_ids
from megagpt.stages import LossStage


class PretrainStage(LossStage):
    def __init__(self, cfg: Config, dataset: Dataset, dist: DistInfo, device: torch.device,
                 grad_accum_steps: int):
        super().__init__(cfg, dataset, dist, device, grad_accum_steps)
        self.loader = TrainLoader(dataset, cfg.model.block_size, cfg.train.micro_batch_size, grad_accum_steps,
                                  dist.rank, dist.world_size, seed=cfg.train.seed,
                                  num_workers=cfg.data.num_workers, on_corrupt_shard=cfg.data.on_corrupt_shard)
        # made now: a val split too small for the block is refused before the run dir is written
        self.eval_windows = EvalWindows(dataset, "val", cfg.model.block_size, cfg.data.on_corrupt_shard)

    def loss(self, engine, batch) -> torch.Tensor:
        _, loss = engine(*batch)
        return loss

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """The mean loss over train.eval_steps fixed val batches per rank (the same batches every time)."""
        batches = self.eval_windows.batches(self.cfg.train.micro_batch_size, self.cfg.train.eval_steps,
                                             self.dist.rank, self.dist.world_size)
        engine.eval()
        losses = [engine(x.to(self.device), y.to(self.device))[1].float() for x, y in batches]
        engine.train()
        return {"val_loss": mean_over_ranks(torch.stack(losses).mean()).item()}

    def sample(self, engine, step: int) -> str | None:
        """A short completion of train.sample_prompt; every rank runs it (ZeRO-3 needs all of them)."""
        if self.cfg.train.sample_tokens == 0:
            return None
        tokenizer = self.dataset.tokenizer
        prompt = torch.tensor([prompt_ids(tokenizer, self.cfg.train.sample_prompt)], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + step)  # not the
        # training RNG: sampling at an evaluation leaves the run's random stream untouched
        out = generate(engine.module, prompt, self.cfg.train.sample_tokens, temperature=DEFAULT_TEMPERATURE,
                       top_k=DEFAULT_TOP_K, generator=generator)
        engine.module.train()
        return tokenizer.decode(out[0].tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])  # global positions: valid on any world size
