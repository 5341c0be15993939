"""Load a trained model for inference on one process, from a run dir (any ZeRO stage) or an export dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megagpt.checkpoint import Checkpointer, step_of, tag_for, verify_manifest
from megagpt.config import load_config
from megagpt.distributed import DistInfo
from megagpt.errors import UserError
from megagpt.reward_model import inference_model
from megagpt.universal import is_zero_partitioned

TOKENIZER_DIR = (
    "tokenizer"  # in a run dir and an export dir: the dataset's manifest.json and tokenizer.* files
)
EXPORT_MARKER = "export.json"  # what an export dir was made from; written last


def copy_tokenizer(dataset_dir: Path, dest: Path) -> None:
    """So a run or export samples without the dataset: manifest.json plus the tokenizer.* files."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in [Path(dataset_dir) / "manifest.json", *Path(dataset_dir).glob("tokenizer*")]:
        shutil.copy2(path, dest / path.name)


def is_run_dir(path: Path) -> bool:
    """Written by `megagpt train`: a config plus checkpoints or metrics."""
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def is_export_dir(path: Path) -> bool:
    """Written by `megagpt export`: the weights plus the marker written last."""
    return (path / "model.safetensors").is_file() and (path / EXPORT_MARKER).is_file()


def resolve_tag(run_dir: Path, step: int | None) -> str:
    """The newest verified checkpoint, or the one of `step`; a one-line error when there is none."""
    ckpt = Checkpointer(run_dir / "checkpoints", DistInfo(0, 0, 1))
    if step is None:
        tag = ckpt.latest_good_tag()
        if tag is None:
            raise UserError(f"{run_dir / 'checkpoints'}: no complete checkpoint to load")
        return tag
    tag = tag_for(step)
    if not (ckpt.directory / tag).is_dir():
        steps = ", ".join(str(step_of(t)) for t in ckpt.tags()) or "none"
        raise UserError(f"--step {step}: {run_dir} has no checkpoint of that step; available steps: {steps}")
    problem = verify_manifest(ckpt.directory / tag)
    if problem:
        raise UserError(f"--step {step}: {problem}")
    return tag


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed's files: the module state (ZeRO 0) or zero_to_fp32's merge of the shards."""
    ckpt_dir = run_dir / "checkpoints"
    if is_zero_partitioned(ckpt_dir / tag):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def load_for_inference(path: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config) from a run dir or an export dir."""
    from megagpt.dataset import load_tokenizer

    path = Path(path)
    cfg, state = _load_weights(path, step)
    model, state = inference_model(cfg, state)  # a GPT; a reward run's RewardModel; a ppo run's policy alone
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()  # "Error(s) in loading state_dict for GPT:", then the details
        detail = lines[-1 if len(lines) > 1 else 0].strip()[:160]
        raise UserError(f"{path / 'config.yaml'} does not describe the saved weights ({detail}); was it edited "
                        f"after training?") from None
    tokenizer_dir = path / TOKENIZER_DIR if (path / TOKENIZER_DIR).is_dir() else Path(cfg.data.dataset_dir)
    return model.to(device).eval(), load_tokenizer(tokenizer_dir), cfg


def _load_weights(path: Path, step: int | None):
    """(config, state dict) of a run dir's checkpoint or an export dir's safetensors; never one for the other."""
    if is_run_dir(path):  # an export written into a run dir (older megagpt allowed it) is not what it holds
        return load_config(path / "config.yaml"), consolidated_state_dict(path, resolve_tag(path, step))
    if not is_export_dir(path):
        raise UserError(f"{path}: neither a run dir (config.yaml with checkpoints/ or metrics.jsonl, from "
                        f"`megagpt train`) nor an export dir (model.safetensors with {EXPORT_MARKER}, from "
                        f"`megagpt export`)")
    source = json.loads((path / EXPORT_MARKER).read_text())
    if step is not None:
        raise UserError(f"--step {step}: {path} is an export of one checkpoint ({source.get('checkpoint')}); "
                        f"--step picks a checkpoint of a run dir")
    if source.get("format") == "hf":
        raise UserError(f"{path}: a Hugging Face GPT-2 export; load it with transformers "
                        f"(GPT2LMHeadModel.from_pretrained), or export with --format megagpt to sample it here")
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied: stored once
    return load_config(path / "config.yaml"), state
