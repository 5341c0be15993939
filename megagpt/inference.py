"""Load a trained model for inference on one process, from a run dir (any ZeRO stage), an export dir, or a
Hugging Face GPT-2 folder (megagpt's `export --format hf`, or any with config.json, weights and tokenizer.json)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch

from megagpt.checkpoint import MASTER_NAMES, Checkpointer, step_of, tag_for, verify_manifest
from megagpt.config import Config, config_from_dict, load_config, model_mismatch
from megagpt.distributed import DistInfo, import_deepspeed, warn_once
from megagpt.errors import UserError
from megagpt.hf_gpt2 import (
    HF_CONFIG,
    HF_TOKENIZER,
    HF_WEIGHTS,
    is_hf_folder,
    load_weights_file,
    model_shape,
    read_config,
    read_weights,
)
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


def export_record(path: Path) -> dict:
    """An export dir's export.json: the run, checkpoint, format and dtype it was made from."""
    marker = path / EXPORT_MARKER
    try:
        record = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{marker}: not readable JSON ({e}); export the run again") from None
    if not isinstance(record, dict):
        raise UserError(f"{marker}: a JSON {type(record).__name__}, expected an object; export the run again")
    return record


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


def run_config(run_dir: Path, tag: str) -> Config:
    """The run's config.yaml, refused in one line when its model keys differ from those checkpoint `tag` was
    trained with (an edited config.yaml: n_head or µP's scales load the same tensors into another function)."""
    cfg = load_config(run_dir / "config.yaml")
    saved = Checkpointer(run_dir / "checkpoints", DistInfo(0, 0, 1)).read_manifest(tag).get("model")
    mismatch = model_mismatch(cfg.model, saved) if saved is not None else None  # older manifests: no record
    if mismatch is not None:
        key, value, was = mismatch
        raise UserError(f"{run_dir / 'config.yaml'}: model.{key} is {value!r} but checkpoint {tag} was trained "
                        f"with {was!r}; was it edited after training? put back {key}: {was}")
    return cfg


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed's files: zero_to_fp32's merge of the shards (ZeRO 1-3), or the module state
    (ZeRO 0) with a 16-bit run's fp32 master weights in place of its 16-bit copies."""
    ckpt_dir = run_dir / "checkpoints"
    if is_zero_partitioned(ckpt_dir / tag):
        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # its progress lines would land in `megagpt sample`'s text
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()} | fp32_masters(states)


def fp32_masters(states: dict) -> dict[str, torch.Tensor]:
    """A 16-bit ZeRO-0 checkpoint's fp32 master weights under every module key that holds them (a tied weight's
    names all), as zero_to_fp32 gives ZeRO 1-3's; {} for a checkpoint without them (fp32, or saved before megagpt
    recorded their names: its module weights are the 16-bit copies its evaluations ran with)."""
    names, groups = states.get(MASTER_NAMES), (states.get("optimizer") or {}).get("fp32_groups")
    if not names or not groups:
        return {}
    module, keys_of = states["module"], {}
    for key, tensor in module.items():  # tied weights share their storage, in the saved file too
        keys_of.setdefault(tensor.data_ptr(), []).append(key)
    pairs = zip((n for g in names for n in g), (t for g in groups for t in g), strict=True)
    return {key: master.float() for name, master in pairs for key in keys_of[module[name].data_ptr()]}


def load_for_inference(path: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config) from a run dir, an export dir or a Hugging Face GPT-2 folder."""
    path = Path(path)
    cfg, state = _load_weights(path, step)
    cfg = plain_torch_off_cuda(cfg, device)
    model, state = inference_model(cfg, state)  # a GPT; a reward run's RewardModel; a ppo run's policy alone
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()  # "Error(s) in loading state_dict for GPT:", then the details
        detail = lines[-1 if len(lines) > 1 else 0].strip()[:160]
        described = path / ("config.yaml" if (path / "config.yaml").is_file() else HF_CONFIG)
        raise UserError(f"{described} does not describe the saved weights ({detail}); was it edited "
                        f"after training?") from None
    return model.to(device).eval(), _load_tokenizer(path, cfg), cfg


def plain_torch_off_cuda(cfg, device: str | torch.device):
    """The config with SDPA attention and torch's LayerNorm where it chose the Triton kernels but `device` is no
    CUDA GPU: the same functions of the same weights, where the kernels would run under Triton's interpreter, a
    program at a time (minutes for what SDPA does in a second)."""
    if torch.device(device).type == "cuda" or "triton" not in (cfg.model.attention, cfg.model.norm):
        return cfg
    model = cfg.model.model_copy(update={"attention": "sdpa" if cfg.model.attention == "triton" else
                                         cfg.model.attention, "norm": "torch"})
    return cfg.model_copy(update={"model": model})


def _load_tokenizer(path: Path, cfg):
    """The tokenizer/ a run or export dir carries, a GPT-2 folder's tokenizer.json, else the config's dataset's."""
    from megagpt.dataset import load_tokenizer
    from megagpt.tokenizer import tokenizer_from_file

    if (path / TOKENIZER_DIR).is_dir():
        return load_tokenizer(path / TOKENIZER_DIR)
    if is_run_dir(path) or not is_hf_folder(path):
        return load_tokenizer(Path(cfg.data.dataset_dir))
    if not (path / HF_TOKENIZER).is_file():
        raise UserError(f"{path}: a Hugging Face GPT-2 folder without {HF_TOKENIZER} (nor megagpt's "
                        f"{TOKENIZER_DIR}/); megagpt needs the model's tokenizer to sample it")
    return tokenizer_from_file("huggingface", path / HF_TOKENIZER)


def _load_weights(path: Path, step: int | None):
    """(config, state dict) of a run dir's checkpoint, an export dir's safetensors or a GPT-2 folder's weights;
    never one for the other."""
    if is_run_dir(path):  # an export written into a run dir (older megagpt allowed it) is not what it holds
        tag = resolve_tag(path, step)
        return run_config(path, tag), consolidated_state_dict(path, tag)
    if not path.is_dir():
        what = "a file, not a directory" if path.exists() else "no such directory"
        raise UserError(f"{path}: {what}; pass a run dir, an export dir or a Hugging Face GPT-2 folder")
    if not is_export_dir(path) and not is_hf_folder(path):
        raise UserError(f"{path}: neither a run dir (config.yaml with checkpoints/ or metrics.jsonl, from "
                        f"`megagpt train`) nor an export dir (model.safetensors with {EXPORT_MARKER}, from "
                        f"`megagpt export`), nor a Hugging Face GPT-2 folder ({HF_CONFIG} with "
                        f"{' or '.join(HF_WEIGHTS)})")
    if step is not None:
        what = (f"an export of one checkpoint ({export_record(path).get('checkpoint')})"
                if is_export_dir(path) else "a Hugging Face GPT-2 folder (one model's weights)")
        raise UserError(f"--step {step}: {path} is {what}; --step picks a checkpoint of a run dir")
    if is_hf_folder(path):  # megagpt's `export --format hf` too: its weights are µP-folded, standard GPT-2
        shape, warnings = model_shape(read_config(path), str(path / HF_CONFIG))
        for message in warnings:
            warn_once(message)
        return config_from_dict({"model": shape}, str(path / HF_CONFIG)), read_weights(path)
    state = load_weights_file(path / "model.safetensors")
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied: stored once
    return load_config(path / "config.yaml"), state
