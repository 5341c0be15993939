"""µP beyond the model: the coordinate check (`megagpt mup coord-check`) and µP's multipliers folded into weights.

The coordinate check is microsoft/mup's, standard vs µP, written as a JSON of slopes and a plot each. Each
width's model is trained for a few steps (AdamW on engine.param_groups, a constant LR, no clipping) while
forward hooks record the mean |value| of each layer type's output. Under µP these sizes stay put as the width
grows (log-log slope ≈ 0); under the standard parametrization Adam's updates grow the hidden activations and
the logits with the width. The head size stays that of the config: a width w has w / head_dim heads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from megagpt.config import Config, ModelConfig, load_config, with_vocab_size
from megagpt.errors import UserError, refuse_file_in_the_way
from megagpt.files import write_whole

LAYER_TYPES = ("embedding", "attn_logits", "attn_output", "mlp_output", "residual", "logits")
PARAMETRIZATIONS = ("standard", "mup")


def coord_check(cfg: Config, widths: list[int], steps: int = 10, seeds: int = 3, lr: float | None = None,
                head_dim: int | None = None, progress: bool = False) -> dict:
    """{"values": {param: {layer: {width: [mean |act| per step]}}}, "slopes": {param: {layer: slope}}, ...};
    step 1 is the forward pass at initialisation, step t the one after t-1 updates."""
    from megagpt.dataset import Dataset

    dataset = Dataset(Path(cfg.data.dataset_dir))
    cfg = with_vocab_size(cfg, dataset.vocab_size)
    head_dim = head_dim or cfg.model.head_dim
    _check_widths(widths, head_dim)
    lr = lr or cfg.train.lr
    runs = [(p, w, s) for p in PARAMETRIZATIONS for w in widths for s in range(seeds)]
    sums: dict = defaultdict(float)  # arrays of `steps` once a run has trained: nothing held before
    for param, width, seed in _progress(runs, progress):
        model_cfg = width_config(cfg.model, width, head_dim, param)
        sizes = _train_and_record(model_cfg, cfg, _batches(cfg, dataset, seed, steps), lr, seed)
        for layer in LAYER_TYPES:
            sums[param, layer, width] += np.array(sizes[layer]) / seeds
    values = {p: {layer: {str(w): sums[p, layer, w].tolist() for w in widths} for layer in LAYER_TYPES}
              for p in PARAMETRIZATIONS}
    return {"widths": widths, "steps": steps, "seeds": seeds, "lr": lr, "head_dim": head_dim,
            "mup_base_width": cfg.model.mup_base_width, "values": values,
            "slopes": {p: {layer: slope(widths, values[p][layer], -1) for layer in LAYER_TYPES}
                       for p in PARAMETRIZATIONS},
            "slopes_by_step": {p: {layer: [slope(widths, values[p][layer], t) for t in range(steps)]
                                   for layer in LAYER_TYPES} for p in PARAMETRIZATIONS}}


def slope(widths: list[int], by_width: dict[str, list[float]], step: int) -> float:
    """Least-squares slope of log(mean |act|) against log(width) at one step: 0 is flat, 1 grows like width."""
    y = [math.log(by_width[str(w)][step]) for w in widths]
    return float(np.polyfit(np.log(widths), y, 1)[0])


def width_config(model: ModelConfig, width: int, head_dim: int, parametrization: str) -> ModelConfig:
    """The config's model at another width (same head size, so width / head_dim heads), no dropout."""
    values = {**model.model_dump(), "n_embd": width, "n_head": width // head_dim, "dropout": 0.0,
              "parametrization": parametrization, "activation_checkpointing": False}
    return ModelConfig.model_validate(values)


def _check_widths(widths: list[int], head_dim: int) -> None:
    if len(widths) < 2:
        raise UserError(f"--widths {','.join(map(str, widths))}: give at least two widths")
    for w in widths:
        if w % head_dim or w < head_dim:
            raise UserError(f"--widths: {w} is not a multiple of the head size {head_dim} (model.n_embd / "
                            f"model.n_head, or --head-dim): the check keeps the head size and varies the heads")


def _batches(cfg: Config, dataset, seed: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The seed's `steps` batches, read as they are trained on: the same ones at every width."""
    from megagpt.data import TrainLoader

    loader = TrainLoader(dataset, cfg.model.block_size, cfg.train.micro_batch_size, seed=cfg.train.seed + seed)
    return itertools.islice(loader, steps)


def _train_and_record(model_cfg: ModelConfig, cfg: Config, batches, lr: float, seed: int) -> dict[str, list]:
    from megagpt.engine import param_groups
    from megagpt.model import GPT

    torch.manual_seed(cfg.train.seed + seed)
    try:
        model = GPT(model_cfg).train()
    except RuntimeError as e:  # the allocator's (torch.OutOfMemoryError on a GPU is one too)
        raise UserError(f"--widths: width {model_cfg.n_embd} does not fit in memory "
                        f"({str(e).splitlines()[0][:160]}); give smaller widths") from None
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay, model_cfg), lr=lr,
                                  betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    sizes: dict[str, list] = {layer: [] for layer in LAYER_TYPES}
    with ActivationSizes(model) as recorder:
        for x, y in batches:
            recorder.start_step()
            _, loss = model(x, y)
            for layer, value in recorder.step_means().items():
                sizes[layer].append(value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return sizes


class ActivationSizes:
    """Forward hooks that record mean |output| per layer type (averaged over the blocks) for one forward."""

    def __init__(self, model):
        from megagpt.model import attention_scale

        self.model, self.handles = model, []
        self.scale = attention_scale(model.cfg) or 1.0 / math.sqrt(model.cfg.head_dim)
        self.current: dict[str, list[float]] = defaultdict(list)

    def __enter__(self):
        h = self.model.transformer.h
        self._hook(h[0], "embedding", pre=True)  # the block stack's input: embeddings × α_in
        for block in h:
            self._hook(block.attn.c_attn, "attn_logits", transform=self._attention_logits)
            self._hook(block.attn, "attn_output")
            self._hook(block.mlp, "mlp_output")
            self._hook(block, "residual")
        self._hook(self.model.lm_head, "logits")  # its input already carries µP's α_out/m
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def start_step(self) -> None:
        self.current.clear()

    def step_means(self) -> dict[str, float]:
        return {layer: float(np.mean(self.current[layer])) for layer in LAYER_TYPES}

    def _hook(self, module, layer: str, pre: bool = False, transform=None):
        def record(output):
            with torch.no_grad():
                value = transform(output) if transform else output
                self.current[layer].append(value.float().abs().mean().item())

        if pre:
            self.handles.append(module.register_forward_pre_hook(lambda m, args: record(args[0])))
        else:
            self.handles.append(module.register_forward_hook(lambda m, args, out: record(out)))

    def _attention_logits(self, qkv: torch.Tensor) -> torch.Tensor:
        """The scaled scores q·k × scale of the causal (visible) pairs, from c_attn's output (B, T, 3C)."""
        B, T, C3 = qkv.shape
        n_head = self.model.cfg.n_head
        q, k, _ = (t.view(B, T, n_head, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, T)
        return scores[..., torch.ones(T, T, dtype=torch.bool).tril()]


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="coord check", unit="model")


# ---------------------------------------------------------------------------------------------
# Export: a model without µP's multipliers (Hugging Face GPT-2) computing the same function
# ---------------------------------------------------------------------------------------------
def fold_multipliers(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A µP model's weights rewritten so that GPT-2's maths (scores / √d_head, no multipliers) gives its logits.

    Every multiplier folds, exactly in real arithmetic (one rounding of one product per weight in practice):
      * scores q·k / d_head = (q / √d_head)·k / √d_head: the query rows of c_attn (weight and bias) × 1/√d_head;
      * α_in × (wte[i] + wpe[t]): wte and wpe × α_in; the head is tied to wte, so its logits grew by α_in too,
      * which the final LayerNorm takes back with the output multiplier: ln_f's weight and bias × α_out/(m·α_in)
        (ln_f feeds only the head, so nothing else sees it).
    """
    if cfg.parametrization != "mup":
        return state
    C = cfg.n_embd
    out_scale = cfg.mup_output_alpha / cfg.mup_width_multiplier / cfg.mup_input_alpha
    folded = dict(state)
    for name, t in state.items():
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            scale = torch.ones(t.size(0), *([1] * (t.dim() - 1)), dtype=torch.float64)
            scale[:C] = 1.0 / math.sqrt(cfg.head_dim)  # rows 0..C-1 are q (out, in layout)
            folded[name] = _scaled(t, scale)
        elif name in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
            folded[name] = _scaled(t, cfg.mup_input_alpha)
        elif name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
            folded[name] = _scaled(t, out_scale)
    return folded


def _scaled(t: torch.Tensor, scale) -> torch.Tensor:
    return (t.double() * scale).to(t.dtype)


# ---------------------------------------------------------------------------------------------
# Output: JSON and one plot per parametrization
# ---------------------------------------------------------------------------------------------
def write_results(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_whole(out / "coord_check.json", json.dumps(result, indent=1) + "\n")
    written = [out / "coord_check.json"]
    try:
        import matplotlib
    except ImportError:
        print("megagpt mup coord-check: matplotlib is not installed (pip install 'megagpt[plot]'): wrote the "
              "JSON only")
        return written
    matplotlib.use("Agg")
    for param in PARAMETRIZATIONS:
        written.append(_plot(result, param, out / f"coord_check_{param}.png"))
    return written


def _plot(result: dict, param: str, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    widths, steps = result["widths"], result["steps"]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5), sharex=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, steps))
    for ax, layer in zip(axes.flat, LAYER_TYPES, strict=True):
        for t in range(steps):
            ax.plot(widths, [result["values"][param][layer][str(w)][t] for w in widths], "o-", ms=3,
                    color=colors[t], label=f"step {t + 1}")
        ax.set(xscale="log", yscale="log", xlabel="width (n_embd)",
               title=f"{layer}\nslope {result['slopes'][param][layer]:+.2f}")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(widths, [str(w) for w in widths])
    for row in axes:
        row[0].set_ylabel("mean |activation|")
    axes.flat[-1].legend(fontsize=6, loc="best")
    fig.suptitle(f"coordinate check, {param} parametrization (lr {result['lr']:g}, {result['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def coord_check_main(argv: list[str], prepare_dataset: Callable[[Path], None] | None = None) -> int:
    """`prepare_dataset(dir)`: megagpt.cli's `prepare_known_dataset` (only the CLI may import data_prep), which
    prepares data/shakespeare_char when it is missing, as `megagpt train` does."""
    p = argparse.ArgumentParser(prog="megagpt mup coord-check",
                                description="microsoft/mup's coordinate check: activation sizes over the first "
                                            "steps across widths, standard vs mup (a PNG each, a JSON of slopes)")
    p.add_argument("config", help="YAML config: its depth, head size, data, batch, LR and µP settings")
    p.add_argument("--widths", required=True, help="comma-separated n_embd values, e.g. 64,128,256,512,1024")
    p.add_argument("--steps", type=int, default=10, help="training steps recorded (default 10)")
    p.add_argument("--seeds", type=int, default=3, help="seeds averaged (default 3)")
    p.add_argument("--lr", type=float, help="constant learning rate (default: the config's train.lr)")
    p.add_argument("--head-dim", type=int, help="head size kept at every width (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="folder for coord_check.json and the plots")
    args = p.parse_args(argv)
    widths = _parse_widths(args.widths)
    _check_numbers(args)
    refuse_file_in_the_way(Path(args.out), f"--out {args.out}", "pick another folder")

    cfg = load_config(args.config, args.overrides)
    _check_widths(widths, args.head_dim or cfg.model.head_dim)
    if prepare_dataset is not None:
        prepare_dataset(Path(cfg.data.dataset_dir))
    _require_dataset(Path(cfg.data.dataset_dir))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    result = coord_check(cfg, widths, args.steps, args.seeds, args.lr, args.head_dim, progress=True)
    for path in write_results(result, Path(args.out)):
        print(f"megagpt mup coord-check: wrote {path}")
    for param in PARAMETRIZATIONS:
        slopes = ", ".join(f"{layer} {value:+.2f}" for layer, value in result["slopes"][param].items())
        print(f"  {param:>8}: slope at step {args.steps}: {slopes}")
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.seeds < 1:
        raise UserError(f"--steps {args.steps} --seeds {args.seeds}: both must be at least 1")
    if args.lr is not None and not 0 < args.lr <= torch.finfo(torch.float32).max:
        raise UserError(f"--lr {args.lr}: must be a number above 0 that a float32 holds")
    if args.head_dim is not None and args.head_dim < 1:
        raise UserError(f"--head-dim {args.head_dim}: must be at least 1")


def _require_dataset(directory: Path) -> None:
    from megagpt.dataset import MANIFEST

    if not (directory / MANIFEST).is_file():
        raise UserError(f"data.dataset_dir: {directory} has no {MANIFEST}; prepare it first, e.g. `megagpt prep "
                        f"shakespeare --out {directory}` (`megagpt train` and `megagpt mup coord-check` do that "
                        f"themselves for data/shakespeare_char)")


def _parse_widths(text: str) -> list[int]:
    try:
        widths = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        raise UserError(f"--widths {text!r}: expected comma-separated integers, e.g. 64,128,256") from None
    if any(w < 1 for w in widths):
        raise UserError(f"--widths {text!r}: widths must be positive")
    return widths
