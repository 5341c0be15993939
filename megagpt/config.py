"""The one config tree: YAML (with `base:` inheritance) + `--set` overrides, validated before anything is built."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from megagpt.errors import SEED_MAX, UserError


class ConfigError(UserError):
    """A bad config: the message names the file and the key."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise; assignment is validated so --set cannot smuggle bad values;
    # inf is no learning rate, size or time (nan fails the bounds anyway).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0 for a number."""
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean where this key takes none (YAML reads yes/no/on/off/true/false as booleans)")
        return value


def _admits_bool(annotation: Any) -> bool:
    """Whether a field of this annotation (`bool`, `int | None`, `Literal[0, 1]`, ...) takes a boolean as it is."""
    if annotation in (bool, Any):
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return any(_admits_bool(a) for a in get_args(annotation))
    return False


class ModelConfig(_Section):
    n_layer: int = Field(6, ge=1)
    n_head: int = Field(6, ge=1)
    n_embd: int = Field(384, ge=1)
    block_size: int = Field(256, ge=1)
    vocab_size: int | None = Field(None, ge=1, description="null: taken from the dataset's manifest")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    attention: Literal["math", "sdpa", "triton"] = "sdpa"
    norm: Literal["torch", "triton"] = "torch"
    kernel_tuning: Literal["pruned", "full"] = Field(
        "pruned", description="triton backends' GPU autotune search: a few configs per shape, or the wide one"
    )
    activation_checkpointing: bool = False
    init_std: float = Field(0.02, gt=0, description="σ: std of the normal init of every weight matrix and "
                            "embedding (GPT-2's 0.02); residual projections get σ/√(2·n_layer)")
    parametrization: Literal["standard", "mup"] = Field(
        "standard", description="standard (GPT-2's) or mup: the maximal update parametrization (docs/mup.md), "
        "under which the LR, init and multipliers tuned at width mup_base_width carry over to any n_embd")
    mup_base_width: int = Field(256, ge=1, description="mup: the width (n_embd) the hyperparameters were tuned "
                                "at; hidden matrices get init variance σ²/m and LR lr/m, m = n_embd / this")
    mup_input_alpha: float = Field(1.0, gt=0, description="mup: α_in, multiplies the embeddings' output")
    mup_output_alpha: float = Field(1.0, gt=0, description="mup: α_out, the logits are multiplied by α_out / m")
    note: str | None = Field(None, description="free text, e.g. how a size's shape was resolved")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self

    @model_validator(mode="after")
    def _kernels_take_the_shape(self):
        """The triton backends' sizes (kernels/limits.py), checked here instead of at the first step."""
        if "triton" not in (self.attention, self.norm):
            return self
        from kernels.limits import head_dim_problem, width_problem  # only a triton backend imports triton

        if self.attention == "triton" and (problem := head_dim_problem(self.head_dim)):
            raise ValueError(f"model.attention: triton: head dim model.n_embd / model.n_head = {self.n_embd} / "
                             f"{self.n_head} = {self.head_dim} {problem}; change the shape or use sdpa")
        if self.norm == "triton" and (problem := width_problem(self.n_embd)):
            raise ValueError(f"model.norm: triton: model.n_embd={self.n_embd} {problem}; use torch")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mup_width_multiplier(self) -> float:
        """µP's m = n_embd / mup_base_width; 1 under the standard parametrization."""
        return self.n_embd / self.mup_base_width if self.parametrization == "mup" else 1.0


# Model keys that change parameter shapes: weights only load into a model that agrees on all of them.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
# Keys that change the function the same weights compute (µP's scales): a checkpoint or train.init_from source
# brings its own, and a resume that would change them is refused.
FUNCTION_KEYS = ("parametrization", "mup_base_width", "mup_input_alpha", "mup_output_alpha")
CHECKED_KEYS = (*SHAPE_KEYS, *FUNCTION_KEYS)  # a checkpoint's manifest records them; checked before any load


def model_mismatch(model: ModelConfig, saved: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first of CHECKED_KEYS on which `model` differs from a checkpoint manifest's `model` record, as
    (key, model's value, saved value); µP keys a checkpoint predates count as their defaults."""
    defaults = {key: ModelConfig.model_fields[key].default for key in FUNCTION_KEYS}
    saved = {**defaults, **saved}
    return next(((key, getattr(model, key), saved.get(key)) for key in CHECKED_KEYS
                 if saved.get(key) != getattr(model, key)), None)


class DataConfig(_Section):
    dataset_dir: str = Field(
        "data/shakespeare_char",
        description="a dataset dir written by `megagpt prep`; `megagpt train` prepares the known datasets "
        "(data/shakespeare_char) itself when missing",
    )
    num_workers: int = Field(0, ge=0)
    on_corrupt_shard: Literal["error", "skip"] = "error"


class TrainConfig(_Section):
    stage: Literal["pretrain", "sft", "reward", "dpo", "ppo"] = Field(
        "pretrain", description="the training stage (megagpt/stages/); reward, dpo and ppo read the align section")
    init_from: str | None = Field(
        None, description="start from these weights (only): a run dir (PATH@STEP for a step), an export dir or a "
        "Hugging Face GPT-2 folder; the model shape comes from it (megagpt/init_from.py)")
    max_steps: int = Field(5000, ge=1)
    micro_batch_size: int = Field(64, ge=1)
    grad_accum_steps: int | None = Field(
        None, ge=1, description="null: derived from global_batch_tokens, else 1; set one of the two, not both"
    )
    global_batch_tokens: int | None = Field(
        None, ge=1, description="tokens per optimizer step over all ranks; grad_accum_steps follows from it"
    )
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    lr_decay_steps: int | None = Field(None, ge=1, description="null: max_steps")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    eval_interval: int = Field(250, ge=1)
    eval_steps: int = Field(200, ge=1)
    log_interval: int = Field(10, ge=1)
    checkpoint_interval: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1, description="the last K checkpoints are kept")
    keep_every: int | None = Field(
        None, ge=1, description="also keep every checkpoint whose step is a multiple"
    )
    seed: int = Field(1337, ge=0, le=SEED_MAX)
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="auto: bf16 where the GPU or CPU does bf16 natively, else fp32; fixed at a run's start"
    )
    max_bad_steps: int = Field(5, ge=1, description="non-finite steps in a row that stop the run")
    sample_tokens: int = Field(200, ge=0, description="tokens sampled at each evaluation (0: none)")
    sample_prompt: str = "\n"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null leaves torch's default")
    compile: bool = False

    @model_validator(mode="after")
    def _lr_order(self):
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self

    @model_validator(mode="after")
    def _one_batch_key(self):
        if self.grad_accum_steps is not None and self.global_batch_tokens is not None:
            raise ValueError(
                f"train.grad_accum_steps ({self.grad_accum_steps}) and train.global_batch_tokens "
                f"({self.global_batch_tokens}) are both set: set one (the other follows from it), e.g. "
                f"--set train.global_batch_tokens=null"
            )
        return self


class AlignConfig(_Section):
    """The alignment stages (docs/alignment.md): reward (Bradley-Terry), dpo, ppo."""

    reference: str | None = Field(
        None, description="dpo, ppo: the frozen reference policy (a run dir PATH[@STEP], an export dir or a GPT-2 "
        "folder), loaded at every start, resumes included; null: train.init_from (the SFT model)")
    beta: float = Field(0.1, gt=0, description="dpo: β, the strength of the implicit KL to the reference")
    reward_model: str | None = Field(
        None, description="ppo: the frozen reward model (a run or export dir of train.stage: reward); the value "
        "model starts from it too")
    kl_coef: float = Field(0.05, ge=0, description="ppo: the per-token KL penalty's coefficient (the start value "
                           "when target_kl is set)")
    target_kl: float | None = Field(
        None, gt=0, description="ppo: adapt kl_coef toward this KL per reply (nats, summed over its tokens); "
        "null: kl_coef stays fixed")
    kl_horizon: int = Field(10000, ge=1, description="ppo: the adaptive KL controller's horizon, in replies")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: GAE's discount γ")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE's λ")
    cliprange: float = Field(0.2, gt=0, description="ppo: ε of the clipped policy ratio")
    cliprange_value: float = Field(0.2, gt=0, description="ppo: how far a value may move from its rollout value "
                                   "before the clipped value loss takes over")
    vf_coef: float = Field(0.1, ge=0, description="ppo: the value loss's weight in the one loss of policy + value")
    ppo_epochs: int = Field(2, ge=1, description="ppo: passes over each rollout batch")
    rollout_minibatches: int = Field(
        1, ge=1, description="ppo: a step's rollout holds this many global batches (micro_batch_size x "
        "grad_accum_steps x ranks prompts each): the optimizer updates per PPO epoch")
    max_new_tokens: int = Field(64, ge=1, description="ppo: the longest reply sampled in a rollout (also capped "
                                "by model.block_size)")
    temperature: float = Field(1.0, gt=0, description="ppo: the sampling temperature of rollouts; log-probs are "
                               "those of logits / temperature")
    no_stop_penalty: float = Field(0.0, ge=0, description="ppo: subtracted from the score of a reply that did not "
                                   "end with the end-of-turn token within max_new_tokens")


# DeepSpeed keys megagpt generates from its own (megagpt/ds_config.py) and reads itself: the loader's batch, the
# model's dtype, the ZeRO stage (frozen models, PPO's and DPO's lockstep, clipping), the LR the loop sets each step.
# Given in deepspeed.extra they would override the generated value behind megagpt's back.
GENERATED_DEEPSPEED_KEYS = {
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_params",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps or train.global_batch_tokens",
    "train_batch_size": "train.global_batch_tokens",
    "bf16.enabled": "train.dtype", "bfloat16.enabled": "train.dtype", "fp16.enabled": "train.dtype",
    "optimizer.params.lr": "train.lr", "optimizer.params.betas": "train.beta1 and train.beta2",
    "optimizer.params.weight_decay": "train.weight_decay",
}


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    timeout_minutes: float = Field(2.0, gt=0, description="collective timeout: a dead rank ends the job")
    extra: dict[str, Any] = Field(default_factory=dict, description="merged last into the generated config; "
                                  "not the keys megagpt generates from its own (GENERATED_DEEPSPEED_KEYS)")

    @model_validator(mode="after")
    def _extra_leaves_generated_keys_alone(self):
        for dotted, own in GENERATED_DEEPSPEED_KEYS.items():
            node: Any = self.extra
            for part in dotted.split("."):
                node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
            if node is not _ABSENT:
                raise ValueError(f"deepspeed.extra.{dotted} ({node!r}) would override what megagpt generates "
                                 f"from {own}: set {own} instead")
        return self


_ABSENT = object()


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops: float | None = Field(None, gt=0, description="for MFU on unknown hardware (FLOP/s)")


class PlannerConfig(_Section):
    """The hardware `megagpt plan CONFIG --write` chose zero_stage, micro_batch_size and activation_checkpointing
    for: data that the planner writes and tests re-plan from, never a comment."""

    gpus: int = Field(ge=1, description="data-parallel GPUs of the job")
    gpu: str | None = Field(None, description="GPU type, e.g. H100 (megagpt/hardware.py)")
    gpu_mem_gib: float | None = Field(None, gt=0)
    peak_tflops: float | None = Field(None, gt=0)
    gpus_per_node: int | None = Field(None, ge=1)
    overrides: list[str] = Field(default_factory=list, description="the --set overrides the plan was made with")


class Config(_Section):
    name: str = "megagpt"
    description: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    planner: PlannerConfig | None = Field(None, description="what `megagpt plan --write` planned this config for")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                named: Mapping[str, str] | None = None) -> Config:
    """Read YAML (following `base:` chains), apply `key.sub=value` overrides, validate everything. An error names
    the override it came from as `named` gives it (how the user typed it), else as `--set ITEM`."""
    raw, origins = _read_with_bases(Path(path)) if path is not None else ({}, {})
    if path is not None and origins.get("name") != str(Path(path)):
        # the run's name (runs/<name>) is its own file's, never a base's: a config that extends another must not
        # train on in the other's run dir, and two configs without a name must not share runs/megagpt
        raw["name"] = Path(path).stem
    where = str(path) if path is not None else "<defaults>"
    for item in overrides or []:
        _apply_override(raw, item, f"{named[item]} ({item!r})" if item in (named or {}) else f"--set {item!r}")
    return config_from_dict(raw, where, {o: (named or {}).get(o, f"--set {o}") for o in overrides or []}, origins)


def config_from_dict(raw: dict[str, Any], where: str = "<dict>", overrides: Mapping[str, str] | None = None,
                     origins: Mapping[str, str] | None = None) -> Config:
    """Validated; an error names the override it came from (`overrides`: each item and how to name it), else
    the file that set the key (`origins`, dotted key -> file; else `where`), and the key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"{_source(first, overrides or {}, where, origins or {})}: {_describe(e)}") from None


def _source(error: dict, overrides: Mapping[str, str], where: str, origins: Mapping[str, str]) -> str:
    """Where a bad key came from: the override that sets it (or, for an unknown section, made it), else the file
    that set it, naming the overrides beneath the key (a section's cross-key check fails on the section)."""
    key = ".".join(str(p) for p in error["loc"])
    where = origins.get(key, where)
    keys = {o: o.partition("=")[0].strip() for o in overrides}
    exact = [o for o, k in keys.items() if k == key or key.startswith(k + ".")]
    beneath = [o for o, k in keys.items() if k.startswith(key + ".")]
    if exact or (error["type"] == "extra_forbidden" and beneath):
        return overrides[(exact or beneath)[-1]]  # the last one wins, as it does when applied
    return where + (" with " + " and ".join(overrides[o] for o in beneath) if beneath else "")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def changes_since(saved: Path, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for each key on which cfg differs from a config.yaml that save_config wrote, in key
    order (none when that file is missing or unreadable)."""
    try:
        before = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(before, dict):
        return {}
    old, new = _flatten(before), _flatten(cfg.to_dict())
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def with_vocab_size(cfg: Config, vocab_size: int) -> Config:
    """model.vocab_size filled in from a dataset's vocabulary (null in the config), or checked against it."""
    if cfg.model.vocab_size is None:
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": vocab_size})})
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's vocabulary ({vocab_size})"
        )
    return cfg


def with_global_batch(cfg: Config, tokens: int) -> Config:
    """cfg with train.global_batch_tokens set, gradient accumulation derived from it (the trainer keeps a resumed
    run's global batch on another world size)."""
    train = cfg.train.model_copy(update={"global_batch_tokens": tokens, "grad_accum_steps": None})
    return cfg.model_copy(update={"train": train})


def with_dtype(cfg: Config, dtype: str) -> Config:
    """cfg with train.dtype set (`auto` made concrete by the trainer or the planner)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"dtype": dtype})})


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged YAML of a config file and its `base:` chain, and for each dotted key the file that set it last
    (an error about a key then names the file to edit, a base file included)."""
    shown, path = str(path), path.resolve()
    if path in seen:
        raise ConfigError(f"{seen[-1]}: `base` chain loops back to {path}")
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    own = dict.fromkeys(_flatten(data), shown)
    if base is None:
        return data, own
    bases = base if isinstance(base, list) else [base]  # a list: merged in order, later ones win
    if not bases or not all(isinstance(one, str) and one.strip() for one in bases):
        raise ConfigError(f"{path}: base: expected a config file's path or a list of them (got {base!r})")
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for one in bases:
        if not (path.parent / one).is_file():
            raise ConfigError(f"{path}: base: {one}: no such config file ({path.parent / one})")
        data_of_base, origins_of_base = _read_with_bases(Path(shown).parent / one, seen + (path,))
        merged = deep_merge(merged, data_of_base)
        origins.update(origins_of_base)
    return deep_merge(merged, data), {**origins, **own}


def _read_yaml(path: Path) -> Any:
    """A config file's YAML; a one-line error naming the file and the line for anything unreadable."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{_yaml_problem(e)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # unhashable keys: refused by the base class; `<<` merges may be overridden
            key = self.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {first[key].start_mark.line + 1})",
                    key_node.start_mark)
            first[key] = key_node
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-8, 5e8 and 1.0e8 as text: a float needs a dot and a signed exponent there. Typed keys
# would convert the text, but `deepspeed.extra` hands it to DeepSpeed as a string; read them as YAML 1.2 does.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_problem(error: yaml.YAMLError, one_line: bool = False) -> str:
    """`, line L, column C: not valid YAML: PROBLEM` (1-based, as editors count; only the column for a --set
    value, which is one line) from PyYAML's error."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        where = ""
    else:
        where = f" at column {mark.column + 1}" if one_line else f", line {mark.line + 1}, column {mark.column + 1}"
    problem = getattr(error, "problem", None) or str(error).replace("\n", " ")
    context = getattr(error, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def override_value(text: str) -> Any:
    """A `--set` value as the config reads it (YAML, 1e-8 a number; empty: null); yaml.YAMLError if not YAML."""
    return yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None


def _apply_override(raw: dict[str, Any], item: str, name: str) -> None:
    """`key.sub=value` applied to the raw tree; an error names the override as `name`."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{name}: expected key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{name}: {part} is not a section")
        node = child
    try:
        node[leaf] = override_value(text)
    except yaml.YAMLError as e:
        problem = _yaml_problem(e, one_line=True)
        raise ConfigError(f"{name}: the value{problem}; quote it to pass text") from None


def _nearest_key(loc: tuple) -> str | None:
    """The known key closest to an unknown one, in the same section."""
    section: Any = Config
    for part in loc[:-1]:
        field = section.model_fields.get(part) if isinstance(section, type) else None
        kinds = (field.annotation, *getattr(field.annotation, "__args__", ())) if field else ()
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is None:
            return None
    near = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return ".".join([*map(str, loc[:-1]), near[0]]) if near else None


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        near = _nearest_key(first["loc"])
        return f"unknown key {key!r}" + (f": did you mean {near!r}?" if near else " (check its spelling and section)")
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = msg.removeprefix("Value error, ")
    if kind == "value_error" and key.split(".")[0] in msg:  # cross-field checks already name their keys
        return msg
    more = f" and {error.error_count() - 1} more error(s)" if error.error_count() > 1 else ""
    return f"{key}: {msg}{shown}{more}"
