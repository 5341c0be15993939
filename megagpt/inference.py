"""Load a trained model for inference on one process, from a run dir (any ZeRO stage) or an export dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megagpt.checkpoint import Checkpointer, tag_for, verify_manifest
from megagpt.config import load_config
from megagpt.distributed import DistInfo
from megagpt.errors import UserError
from megagpt.model import GPT

TOKENIZER_DIR = (
    "tokenizer"  # in a run dir and an export dir: the dataset's manifest.json and tokenizer.* files
)


def copy_tokenizer(dataset_dir: Path, dest: Path) -> None:
    """So a run or export samples without the dataset: manifest.json plus the tokenizer.* files."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in [Path(dataset_dir) / "manifest.json", *Path(dataset_dir).glob("tokenizer*")]:
        shutil.copy2(path, dest / path.name)


def resolve_tag(run_dir: Path, step: int | None) -> str:
    ckpt = Checkpointer(run_dir / "checkpoints", DistInfo(0, 0, 1))
    if step is None:
        tag = ckpt.latest_good_tag()
        if tag is None:
            raise UserError(f"{run_dir / 'checkpoints'}: no complete checkpoint to load")
        return tag
    tag = tag_for(step)
    problem = verify_manifest(ckpt.directory / tag)
    if problem:
        raise UserError(f"checkpoint step {step}: {problem}")
    return tag


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed's files: the module state (ZeRO 0) or zero_to_fp32's merge of the shards."""
    ckpt_dir = run_dir / "checkpoints"
    if any((ckpt_dir / tag).glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def load_for_inference(path: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config) from a run dir or an export dir."""
    from megagpt.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path}: no config.yaml here; expected a run dir (megagpt train) or an export dir")
    cfg = load_config(path / "config.yaml")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied: stored once
    else:
        state = consolidated_state_dict(path, resolve_tag(path, step))
    model = GPT(cfg.model)
    model.load_state_dict(state)
    tokenizer_dir = path / TOKENIZER_DIR if (path / TOKENIZER_DIR).is_dir() else Path(cfg.data.dataset_dir)
    return model.to(device).eval(), load_tokenizer(tokenizer_dir), cfg
