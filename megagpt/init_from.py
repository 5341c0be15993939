"""`train.init_from`: start a run from another model's weights (only): a megagpt run dir (`PATH@STEP` picks a
checkpoint; any ZeRO stage, any world size), a megagpt export dir, or a Hugging Face GPT-2 folder.

Weights only: the optimizer, step counter, LR schedule and data position are the new run's own. The model's
shape (layers, heads, width, positions, bias) comes from the source; a config that sets one of those keys to
something else is an error naming both values. The vocabulary is the larger of the source's and the dataset's:
a chat dataset appends special tokens after the base vocabulary, and their embedding rows (the tied head's too)
start at the mean of the source's rows. A run resuming from its own checkpoints never reads init_from again
(its shape comes from its own config.yaml, and megagpt/train.py only loads the source when there is no
resume point).

The weights are loaded into the module before deepspeed.initialize, so every ZeRO stage partitions, and every
optimizer copies, the loaded weights: the first step starts from them (Megatron-LM once built its optimizer
before loading, and the model reverted to its random init after one step; tests/test_init_from.py pins this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megagpt.config import FUNCTION_KEYS, SHAPE_KEYS, Config, ConfigError
from megagpt.dataset import MANIFEST, Dataset, load_manifest, sha256_file
from megagpt.distributed import on_main, warn_once
from megagpt.errors import UserError
from megagpt.hf_gpt2 import (
    HF_CONFIG,
    HF_TOKENIZER,
    HF_WEIGHTS,
    TIED,
    is_hf_folder,
    load_weights_file,
    model_shape,
    read_config,
    read_weights,
)
from megagpt.inference import (
    EXPORT_MARKER,
    TOKENIZER_DIR,
    consolidated_state_dict,
    export_record,
    is_export_dir,
    is_run_dir,
    resolve_tag,
    run_config,
)

WTE = "transformer.wte.weight"


@dataclass
class InitSource:
    """Where the weights come from and what they look like; the weights themselves load on demand."""

    path: Path
    kind: str  # run | export | hf
    shape: dict[str, Any]  # n_layer, n_head, n_embd, block_size, vocab_size, bias
    tag: str | None = None  # the checkpoint of a run dir
    tokenizer_file: Path | None = None
    warnings: list[str] = field(default_factory=list)
    key: str = "train.init_from"  # the config key that named it (align.reference reads a source too), for errors

    def describe(self) -> str:
        what = {"run": "run dir", "export": "export dir", "hf": "Hugging Face GPT-2 folder"}[self.kind]
        return f"{what} {self.path}" + (f" ({self.tag})" if self.tag else "")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights under megagpt's names, the tied head included."""
        if self.kind == "run":
            state = consolidated_state_dict(self.path, self.tag)
        elif self.kind == "export":
            state = load_weights_file(self.path / "model.safetensors")
        else:
            state = read_weights(self.path)
        state = {name: t.float() for name, t in state.items()}
        state[TIED] = state[WTE]
        return state


def parse_spec(spec: str, key: str = "train.init_from") -> tuple[Path, int | None]:
    """`PATH` or `PATH@STEP`; key: the config key that holds it, for the error. A path that exists is that path
    (a folder named `x@2` is not run `x` at step 2); only otherwise is a last `@STEP` split off."""
    path, at, step = spec.rpartition("@")
    if not at or Path(spec).exists():
        return Path(spec), None
    if not (step.isascii() and step.isdigit()):
        raise ConfigError(f"{key}={spec!r}: @{step} is not a step number (PATH@STEP, e.g. runs/x@500)")
    return Path(path), int(step)


def open_source(spec: str, key: str = "train.init_from") -> InitSource:
    """The source named by train.init_from (or another key: align.reference): kind, shape and tokenizer, read
    from its small files only."""
    path, step = parse_spec(spec, key)
    where = f"{key}={spec}"
    if not path.exists():
        raise ConfigError(f"{where}: no such directory")
    if step is not None and not is_run_dir(path):
        raise ConfigError(f"{where}: @{step} picks a checkpoint of a run dir, and {path} is not one")
    if is_run_dir(path):
        tag = on_main(lambda: _as_config_error(where, lambda: resolve_tag(path, step)))
        model = _as_config_error(where, lambda: run_config(path, tag)).model  # refused if edited since `tag`
        return InitSource(path, "run", _keys(model), tag, _megagpt_tokenizer(path), key=key)
    if is_export_dir(path) and export_record(path).get("format") != "hf":
        from megagpt.config import load_config

        return InitSource(path, "export", _keys(load_config(path / "config.yaml").model), None,
                          _megagpt_tokenizer(path), key=key)
    if is_hf_folder(path):
        shape, warnings = model_shape(read_config(path), str(path / HF_CONFIG))
        tokenizer = path / HF_TOKENIZER if (path / HF_TOKENIZER).is_file() else None
        if tokenizer is None and (path / TOKENIZER_DIR).is_dir():  # megagpt's own HF export
            tokenizer = _megagpt_tokenizer(path)
        return InitSource(path, "hf", {**shape, "parametrization": "standard"}, None, tokenizer, warnings, key)
    raise ConfigError(f"{where}: neither a megagpt run dir (config.yaml + checkpoints/), a megagpt export dir "
                      f"(model.safetensors + {EXPORT_MARKER}) nor a Hugging Face GPT-2 folder (config.json + "
                      f"{' or '.join(HF_WEIGHTS)})")


def _as_config_error(where: str, read: Callable[[], Any]) -> Any:
    """read(); its one-line UserError (worded for `megagpt sample --step`) as the config key's error."""
    try:
        return read()
    except UserError as e:
        raise ConfigError(f"{where}: {str(e).replace('--step', 'step')}") from None


def _keys(model) -> dict[str, Any]:
    """What the source fixes: its shape, and the µP keys that change the function its weights compute."""
    return {key: getattr(model, key) for key in (*SHAPE_KEYS, *FUNCTION_KEYS)}


def _megagpt_tokenizer(path: Path) -> Path | None:
    folder = path / TOKENIZER_DIR
    if not (folder / MANIFEST).is_file():
        return None
    return folder / load_manifest(folder).tokenizer.file


# ---------------------------------------------------------------- the run's config from the source


def resolve(cfg: Config, dataset: Dataset, run_dir: Path) -> tuple[Config, InitSource | None]:
    """The config with the source's model shape filled in (or an error on a conflict), and the source.

    A run dir that already holds checkpoints resumes from them: the shape is the one its config.yaml recorded,
    and the source is not opened (it may be gone); a shape key set otherwise then fails the resume check."""
    if not cfg.train.init_from:
        return cfg, None
    if _has_checkpoints(run_dir) and (run_dir / "config.yaml").is_file():
        from megagpt.config import load_config

        saved = _keys(load_config(run_dir / "config.yaml").model)
        update = {key: value for key, value in saved.items() if key not in cfg.model.model_fields_set}
        return _with_model(cfg, update), None
    source = open_source(cfg.train.init_from)
    for message in source.warnings:
        warn_once(message)
    check_tokenizer(source, dataset)
    shape = {**source.shape, "vocab_size": max(source.shape["vocab_size"], dataset.vocab_size)}
    explicit = cfg.model.model_fields_set
    for key, value in shape.items():
        mine = getattr(cfg.model, key)
        if key in explicit and mine is not None and mine != value:
            raise ConfigError(f"model.{key}={mine!r} conflicts with train.init_from={cfg.train.init_from} "
                              f"({key}={value!r}): the model's shape comes from the source; remove model.{key}")
    return _with_model(cfg, shape), source


def _has_checkpoints(run_dir: Path) -> bool:
    from megagpt.checkpoint import TAG_PATTERN

    folder = Path(run_dir) / "checkpoints"
    return folder.is_dir() and any(TAG_PATTERN.match(p.name) for p in folder.iterdir())


def _with_model(cfg: Config, update: dict[str, Any]) -> Config:
    model = type(cfg.model).model_validate({**cfg.model.model_dump(), **update})
    return cfg.model_copy(update={"model": model})


def check_tokenizer(source: InitSource, dataset: Dataset) -> None:
    """The dataset must be tokenized with the source's tokenizer (chat tokens appended are fine)."""
    if source.tokenizer_file is None:
        warn_once(f"{source.key}: {source.describe()} carries no tokenizer; make sure {dataset.dir} was "
                  f"prepared with the tokenizer the model was trained with")
        return
    mine = dataset.dir / dataset.manifest.tokenizer.file
    if sha256_file(mine) != sha256_file(source.tokenizer_file):
        advice = (f"prepare the data with `megagpt prep chat --tokenizer {source.path}`"
                  if source.key == "train.init_from" else f"{source.key} must be a model of the data's tokenizer")
        raise ConfigError(f"{source.key}: {source.describe()} was trained with the tokenizer "
                          f"{source.tokenizer_file}, but data.dataset_dir {dataset.dir} uses another one ({mine}); "
                          f"{advice}")


# ---------------------------------------------------------------- the weights into a new model


def load_into(model: torch.nn.Module, source: InitSource) -> torch.nn.Module:
    """The source's weights into `model` (built with the resolved config); new vocabulary rows at the mean."""
    state = source.state_dict()
    wte = state[WTE]
    rows = model.transformer.wte.weight.shape[0]
    if wte.shape[0] < rows:
        mean = wte.mean(dim=0, keepdim=True).expand(rows - wte.shape[0], -1)
        state[WTE] = state[TIED] = torch.cat([wte, mean])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = lines[-1 if len(lines) > 1 else 0].strip()[:200]
        raise UserError(f"{source.key}: the weights of {source.describe()} do not fit the model ({detail})") \
            from None
    return model


def loader(build_model, source: InitSource):
    """build_model, then the source's weights into what it built (before deepspeed.initialize sees it)."""
    return lambda: load_into(build_model(), source)
