"""Hugging Face GPT-2 <-> megagpt: the one weight-name mapping and config translation, used both ways, and the
reading of a GPT-2 folder (config.json + model.safetensors or pytorch_model.bin, whole or in shards named by an
index.json, maybe tokenizer.json).

GPT2LMHeadModel has megagpt's architecture (pre-LN blocks, learned positions, tied head, 4x MLP) with another
weight layout: its Conv1D keeps weights as (in, out) where nn.Linear keeps (out, in), so those four matrices are
transposed on the way in and on the way out; every other name is the same. `megagpt export --format hf` uses
`hf_state_dict`/`hf_config`; `train.init_from` of a GPT-2 folder (megagpt/init_from.py) and `megagpt sample` /
`chat` of one (megagpt/inference.py) use `read_config`, `model_shape` and `read_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megagpt.errors import UserError

# nn.Linear keeps weights as (out, in); GPT-2's Conv1D as (in, out): these are transposed both ways.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-persistent buffers that older transformers versions saved with the weights (the causal mask).
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
TIED = "lm_head.weight"  # the same tensor as transformer.wte.weight
HF_CONFIG = "config.json"
# A GPT-2 folder's weights, in the order transformers looks for them: one file, or shards named by an index.json
# whose weight_map takes each tensor's name to its shard (save_pretrained's max_shard_size).
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HF_TOKENIZER = "tokenizer.json"  # a `tokenizers` file; megagpt's own export carries tokenizer/ instead
LFS_POINTER = b"version https://git-lfs"  # how a git clone without git-lfs leaves a weights file


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: config.json plus weights (the model type is checked by model_shape)."""
    return (path / HF_CONFIG).is_file() and any((path / name).is_file() for name in HF_WEIGHTS)


def read_config(path: Path) -> dict:
    """The folder's config.json; a one-line UserError when it is not JSON."""
    try:
        config = json.loads((path / HF_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / HF_CONFIG}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / HF_CONFIG}: a JSON {type(config).__name__}, expected an object (GPT2Config's keys)")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The folder's weights under megagpt's names, fp32, the tied head included."""
    name = next(name for name in HF_WEIGHTS if (path / name).is_file())
    state = (load_shards if name.endswith(".index.json") else load_weights_file)(path / name)
    if not any(key in state for key in ("transformer.wte.weight", "wte.weight")):
        raise UserError(f"{path / name}: no wte.weight (GPT-2's token embedding); not a GPT-2 model's weights")
    return megagpt_state_dict(state)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A model.safetensors (a GPT-2 folder's, an export dir's) or pytorch_model.bin as stored; a one-line
    UserError naming the file when it is not readable (copied in part, a git-lfs pointer never pulled)."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        why = ("a git-lfs pointer, not the weights: fetch them with `git lfs pull`" if _is_lfs_pointer(path) else
               f"not readable ({detail}); copied in part? copy or export it again")
        raise UserError(f"{path}: {why}") from None


def load_shards(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard an index.json names, each shard read as `load_weights_file` reads one file; a
    one-line UserError naming the index and the shard that is missing or lacks a tensor the index puts in it."""
    weight_map = _weight_map(index)
    state = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise UserError(f"{index}: its shard {shard} is missing from {index.parent}; copy or download it too")
        tensors = load_weights_file(index.parent / shard)
        lacking = [name for name, where in weight_map.items() if where == shard and name not in tensors]
        if lacking:
            raise UserError(f"{index}: puts {lacking[0]} in {shard}, which does not hold it; the shards are not "
                            f"the ones this index was written with")
        state.update(tensors)
    return state


def _weight_map(index: Path) -> dict[str, str]:
    """An index.json's weight_map (tensor name -> shard file name in the same folder), or a one-line UserError."""
    try:
        record = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index}: not readable JSON ({e})") from None
    weight_map = record.get("weight_map") if isinstance(record, dict) else None
    plain_names = isinstance(weight_map, dict) and all(
        isinstance(shard, str) and shard and Path(shard).name == shard for shard in weight_map.values())
    if not weight_map or not plain_names:
        raise UserError(f"{index}: expected a weight_map from tensor names to shard file names in "
                        f"{index.parent}, got {str(weight_map)[:80]!r}")
    return weight_map


def _is_lfs_pointer(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def hf_state_dict(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
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


def megagpt_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's, without the `transformer.` prefix) weights -> megagpt's, fp32."""
    out = {}
    for name, t in hf_state.items():
        if name.endswith(HF_BUFFERS) or name == TIED:
            continue
        name = name if name.startswith("transformer.") else f"transformer.{name}"
        out[name] = (t.t() if name.endswith(CONV1D_SUFFIXES) else t).float().contiguous()
    out[TIED] = out["transformer.wte.weight"]
    return out


def hf_config(cfg, dtype: str, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """GPT2Config's keys for this model. The token ids are always written: left out, GPT2Config would fill in
    GPT-2's 50256, which a smaller vocabulary does not have (transformers warns on loading)."""
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
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
    }


# What megagpt's GPT computes; a config.json asking for anything else is refused (or, for GELU, warned about).
_REQUIRED = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False, "tie_word_embeddings": True}
APPROXIMATE_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def model_shape(config: dict, where: str) -> tuple[dict, list[str]]:
    """(megagpt model keys, warnings) from a GPT-2 config.json; a UserError for what megagpt cannot compute."""
    if config.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type {config.get('model_type')!r}, expected 'gpt2' (GPT2LMHeadModel)")
    n_embd = config.get("n_embd", 768)
    for key, value in _REQUIRED.items():
        if config.get(key, value) != value:
            raise UserError(f"{where}: {key}={config[key]!r}; megagpt's GPT computes {key}={value!r}")
    if config.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{where}: n_inner={config['n_inner']}; megagpt's MLP is 4 x n_embd = {4 * n_embd}")
    warnings = []
    activation = config.get("activation_function", "gelu_new")
    if activation in APPROXIMATE_GELUS:
        warnings.append(f"{where}: activation_function {activation!r} is GELU's tanh approximation; megagpt "
                        f"computes the exact GELU (outputs differ by < 1e-3 per activation)")
    elif activation != "gelu":
        raise UserError(f"{where}: activation_function {activation!r}; megagpt's MLP uses GELU")
    shape = {"n_layer": config.get("n_layer", 12), "n_head": config.get("n_head", 12), "n_embd": n_embd,
             "block_size": config.get("n_positions", 1024), "vocab_size": config.get("vocab_size", 50257),
             "bias": True}
    return shape, warnings
