"""`megagpt export`: a run's checkpoint (any ZeRO stage) as a standalone folder, megagpt or HF GPT-2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megagpt.config import Config, load_config, save_config
from megagpt.errors import UserError
from megagpt.inference import TOKENIZER_DIR, consolidated_state_dict, resolve_tag

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIED = "lm_head.weight"  # the same tensor as transformer.wte.weight: stored once
# nn.Linear keeps weights as (out, in); GPT-2's Conv1D as (in, out): these are transposed for Hugging Face.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def export_main(args) -> int:
    out = export(Path(args.run_dir), Path(args.out), args.step, args.format, args.dtype)
    print(f"megagpt export: wrote {out}")
    return 0


def export(run_dir: Path, out: Path, step: int | None = None, fmt: str = "megagpt",
           dtype: str = "fp32") -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml here; expected a run dir written by `megagpt train`")
    if fmt not in ("megagpt", "hf"):
        raise UserError(f"--format {fmt!r}: expected megagpt or hf")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = load_config(run_dir / "config.yaml")
    tag = resolve_tag(run_dir, step)
    state = consolidated_state_dict(run_dir, tag)
    state = {name: t.to(DTYPES[dtype]).contiguous() for name, t in state.items() if name != TIED}

    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        _save(hf_state_dict(state, cfg), out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    else:
        _save(state, out / "model.safetensors")
        save_config(cfg, out / "config.yaml")
    if (run_dir / TOKENIZER_DIR).is_dir():
        shutil.copytree(run_dir / TOKENIZER_DIR, out / TOKENIZER_DIR, dirs_exist_ok=True)
    source = {"run_dir": str(run_dir.resolve()), "checkpoint": tag, "format": fmt, "dtype": dtype}
    (out / "export.json").write_text(json.dumps(source, indent=1) + "\n")
    return out


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})  # transformers refuses files without "format"


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2: same architecture (pre-LN, learned positions, tied head), different weight layout.
# ---------------------------------------------------------------------------------------------
def hf_state_dict(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """megagpt names and layout -> GPT2LMHeadModel's; bias=False models get the zero biases GPT-2 has."""
    m = cfg.model
    out = {name: (t.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else t) for name, t in state.items()}
    like = state["transformer.wte.weight"]
    widths = {"ln_1": m.n_embd, "ln_2": m.n_embd, "attn.c_attn": 3 * m.n_embd, "attn.c_proj": m.n_embd,
              "mlp.c_fc": 4 * m.n_embd, "mlp.c_proj": m.n_embd}
    prefixes = [f"transformer.h.{i}.{module}" for i in range(m.n_layer) for module in widths]
    for prefix in [*prefixes, "transformer.ln_f"]:
        width = widths[prefix.split(".", 3)[-1]] if prefix != "transformer.ln_f" else m.n_embd
        out.setdefault(f"{prefix}.bias", torch.zeros(width, dtype=like.dtype))
    return out


def hf_config(cfg: Config, dtype: str) -> dict:
    m = cfg.model
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.block_size,
        "n_ctx": m.block_size,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": 4 * m.n_embd,
        "activation_function": "gelu",  # exact erf GELU like nn.GELU(); GPT-2's default gelu_new is tanh
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
    }
