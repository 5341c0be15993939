"""The communication maths of `megagpt plan`: bytes each GPU sends per step under ZeRO 0-3, and their time.

Accounting of the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", §7). Ψ parameters, N data-parallel GPUs. A ring reduce-scatter or all-gather of Ψ elements
sends Ψ·(N−1)/N elements from every GPU; an all-reduce is one of each, 2Ψ·(N−1)/N.
  ZeRO-0 (data parallel):  all-reduce of the gradients                                        2Ψ
  ZeRO-1, ZeRO-2:           reduce-scatter of the gradients + all-gather of the updated weights   2Ψ
  ZeRO-3:                   all-gather of the weights for the forward and again for the backward
                            + reduce-scatter of the gradients                                   3Ψ
Gradient accumulation over A micro-batches, as DeepSpeed does it (runtime/engine.py, allreduce_gradients:
"ZeRO stage >= 2 communicates during non gradient accumulation boundaries as well"):
  ZeRO-0/1 reduce once per step, at the accumulation boundary:                  2Ψ per step
  ZeRO-2 reduce-scatters in every micro-batch's backward (gradients are partitioned, so no rank can hold
  a whole accumulated gradient), then all-gathers the weights once:             (A + 1)Ψ
  ZeRO-3 also gathers the weights for every micro-batch's forward and backward: 3AΨ
Elements are 2 bytes in bf16/fp16 training (DeepSpeed communicates in the model's dtype) and 4 in fp32.

Time: a collective over GPUs of one node runs at the intra-node bandwidth per GPU (NVLink); one over several
nodes is a ring that crosses the nodes' network, so it runs at the slowest link: min(intra, inter-node per
node ÷ GPUs per node). Bandwidths are link peaks per direction; NCCL's measured bus bandwidth
(nccl-tests all_reduce_perf "busbw") is the realistic figure to pass with the flags.

Overlap: DeepSpeed overlaps ZeRO-3's gathers and reduce-scatters with compute by default (overlap_comm is
true for stage 3), ZeRO-1/2 only with `overlap_comm: true`, and ZeRO-0 all-reduces after the backward. The
overlapped step is max(compute, communication) (a bound: nothing hides perfectly); the serial one their sum.
A plan is communication-bound when its communication alone outlasts its compute.

ZeRO++ (Wang et al. 2023, "ZeRO++: Extremely Efficient Collective Communication for Giant Model Training";
DeepSpeed implements it for ZeRO-3): qwZ gathers the forward's weights in int8 (1 byte), hpZ keeps a second
copy of the weights partitioned within each node so the backward's gather stays on NVLink (2Ψ/g more bytes of
memory per GPU), qgZ reduce-scatters the gradients in int4 (0.5 byte). Together they cut the bytes that
cross nodes from 3Ψ·2 to Ψ·1 + Ψ·0.5, the paper's 4x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megagpt.errors import UserError

GB = 1e9  # link bandwidths are quoted in decimal gigabytes per second


@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float  # peak per direction: per GPU for intra-node links, per node (all its NICs) for networks


# NVLink: NVIDIA A100 / H100 datasheets (600 / 900 GB/s per GPU, both directions together). PCIe x16 per
# direction. InfiniBand: HDR 200 Gb/s, NDR 400 Gb/s a port, one port per GPU as in DGX A100 / DGX H100 (8 a node).
LINKS = {
    link.name: link
    for link in [
        Link("NVLink 3", 300.0),
        Link("NVLink 4", 450.0),
        Link("PCIe 4", 32.0),
        Link("PCIe 5", 64.0),
        Link("InfiniBand HDR x8", 8 * 25.0),
        Link("InfiniBand NDR x8", 8 * 50.0),
    ]
}
# Per GPU of hardware.GPUS: (intra-node link, inter-node network) of the usual 8-GPU server. PCIe and NVL cards
# talk over PCIe 5 within a node (NVL's NVLink bridges pair only two of them).
DEFAULT_LINKS = {
    "H200": ("NVLink 4", "InfiniBand NDR x8"),
    "H100-SXM": ("NVLink 4", "InfiniBand NDR x8"),
    "H100-PCIe": ("PCIe 5", "InfiniBand NDR x8"),
    "H100-NVL": ("PCIe 5", "InfiniBand NDR x8"),
    "A100-80GB": ("NVLink 3", "InfiniBand HDR x8"),
    "A100-40GB": ("NVLink 3", "InfiniBand HDR x8"),
}
FALLBACK_LINKS = ("NVLink 4", "InfiniBand NDR x8")  # a GPU given only by memory and peak
ZEROPP = ("hpZ", "qwZ", "qgZ")
ZEROPP_BYTES = {"qwZ": 1.0, "qgZ": 0.5}  # int8 weights, int4 gradients


@dataclass(frozen=True)
class Network:
    intra_gbytes_per_s: float  # per GPU, per direction
    inter_gbytes_per_s: float  # per node, per direction
    gpus_per_node: int
    intra_name: str = "custom"
    inter_name: str = "custom"

    def bandwidth(self, group: int) -> float:
        """Bytes/s per GPU of a ring over `group` GPUs: NVLink inside a node, else the slowest link."""
        if group <= self.gpus_per_node:
            return self.intra_gbytes_per_s * GB
        return min(self.intra_gbytes_per_s, self.inter_gbytes_per_s / self.gpus_per_node) * GB


def network_for(gpu_name: str, gpus_per_node: int = 8, intra: float | None = None,
                inter: float | None = None) -> Network:
    """The GPU's usual links, each overridable (GB/s per direction: intra per GPU, inter per node)."""
    intra_name, inter_name = DEFAULT_LINKS.get(gpu_name, FALLBACK_LINKS)
    return Network(intra if intra is not None else LINKS[intra_name].gbytes_per_s,
                   inter if inter is not None else LINKS[inter_name].gbytes_per_s, gpus_per_node,
                   "custom" if intra is not None else intra_name, "custom" if inter is not None else inter_name)


@dataclass(frozen=True)
class Collective:
    what: str
    elements: float  # elements each GPU sends (already × (group − 1)/group)
    bytes_per_element: float
    group: int  # GPUs in the ring

    @property
    def bytes(self) -> float:
        return self.elements * self.bytes_per_element


def _ring(what: str, params: float, group: int, e: float, times: int = 1) -> Collective:
    return Collective(what, times * params * (group - 1) / group, e, group)


def collectives(params: float, zero_stage: int, gpus: int, accum: int, e: float,
                zeropp: frozenset[str] = frozenset(), gpus_per_node: int = 8) -> list[Collective]:
    """What each GPU sends in one optimizer step (see the module docstring); zeropp: the ZeRO++ parts of ZeRO-3
    in use, of hpZ, qwZ, qgZ."""
    if zero_stage == 0:
        return [_ring("gradient all-reduce", params, gpus, e, times=2)]
    if zero_stage == 1:
        return [_ring("gradient reduce-scatter", params, gpus, e), _ring("weight all-gather", params, gpus, e)]
    if zero_stage == 2:
        return [_ring("gradient reduce-scatter per micro-batch", params, gpus, e, times=accum),
                _ring("weight all-gather", params, gpus, e)]
    qw, hp, qg = "qwZ" in zeropp, "hpZ" in zeropp, "qgZ" in zeropp
    return [_ring("forward weight all-gather" + (", int8 (qwZ)" if qw else ""), params, gpus,
                  ZEROPP_BYTES["qwZ"] if qw else e, times=accum),
            _ring("backward weight all-gather" + (" in the node (hpZ)" if hp else ""), params,
                  min(gpus, gpus_per_node) if hp else gpus, e, times=accum),
            _ring("gradient reduce-scatter" + (", int4 (qgZ)" if qg else ""), params, gpus,
                  ZEROPP_BYTES["qgZ"] if qg else e, times=accum)]


def hpz_partition_size(zero_optimization: Any) -> int:
    """The GPUs hpZ partitions its weight copy over in a DeepSpeed `zero_optimization` section (1: hpZ off); a
    one-line error for a section or size that is not one."""
    key = "deepspeed.extra.zero_optimization"
    if not isinstance(zero_optimization, dict):
        raise UserError(f"{key}: expected a mapping of DeepSpeed's ZeRO settings (got {zero_optimization!r})")
    size = zero_optimization.get("zero_hpz_partition_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"{key}.zero_hpz_partition_size: expected a number of GPUs, at least 1 (got {size!r})")
    return size


def switch(zero_optimization: dict, name: str) -> bool | None:
    """A true/false key of a DeepSpeed `zero_optimization` section, None where unset; a one-line error for anything
    else (the text "false" would otherwise count as on)."""
    value = zero_optimization.get(name)
    if value is not None and not isinstance(value, bool):
        raise UserError(f"deepspeed.extra.zero_optimization.{name}: expected true or false (got {value!r})")
    return value


def zeropp_in(zero_optimization: dict) -> frozenset[str]:
    """The ZeRO++ parts a DeepSpeed `zero_optimization` section turns on."""
    parts = {"hpZ": hpz_partition_size(zero_optimization) > 1,
             "qwZ": bool(switch(zero_optimization, "zero_quantized_weights")),
             "qgZ": bool(switch(zero_optimization, "zero_quantized_gradients"))}
    return frozenset(name for name, on in parts.items() if on)


def bytes_per_gpu(params: float, zero_stage: int, gpus: int, accum: int, e: float,
                  zeropp: frozenset[str] = frozenset(), gpus_per_node: int = 8) -> float:
    return sum(c.bytes for c in collectives(params, zero_stage, gpus, accum, e, zeropp, gpus_per_node))


def hpz_bytes(params: float, gpus_per_node: int) -> float:
    """hpZ's secondary copy of the 16-bit weights, partitioned over one node's GPUs: bytes per GPU."""
    return 2 * params / gpus_per_node


def seconds(colls: list[Collective], network: Network) -> float:
    return sum(c.bytes / network.bandwidth(c.group) for c in colls)


def overlaps_by_default(zero_stage: int, overlap_comm: bool | None) -> bool:
    """Whether DeepSpeed overlaps this stage's communication: overlap_comm, whose default is stage 3 only."""
    if zero_stage == 0:
        return False
    return zero_stage == 3 if overlap_comm is None else bool(overlap_comm)


def step(params: float, zero_stage: int, gpus: int, accum: int, e: float, compute_seconds: float,
         network: Network, overlap_comm: bool | None = None, zeropp: frozenset[str] = frozenset()) -> dict:
    """Bytes, communication time and step time of one stage: serial, overlapped, and what DeepSpeed does."""
    colls = collectives(params, zero_stage, gpus, accum, e, zeropp, network.gpus_per_node)
    comm = seconds(colls, network) if gpus > 1 else 0.0
    overlapped, serial = max(compute_seconds, comm), compute_seconds + comm
    overlap = overlaps_by_default(zero_stage, overlap_comm)
    return {"bytes_per_gpu": sum(c.bytes for c in colls) if gpus > 1 else 0.0,
            "comm_seconds": comm, "compute_seconds": compute_seconds,
            "step_seconds_overlapped": overlapped, "step_seconds_serial": serial, "overlap": overlap,
            "step_seconds": overlapped if overlap else serial,
            "communication_bound": comm > compute_seconds,
            "collectives": [{"what": c.what, "gbytes": c.bytes / GB, "group": c.group} for c in colls]}


def remedies(zero_stage: int, accum: int, micro_batch: int, overlap: bool, gpus: int, gpus_per_node: int,
             global_batch_tokens: int | None, zeropp: frozenset[str] = frozenset()) -> list[dict]:
    """DeepSpeed's own remedies that apply to this stage (and are not on yet), as config keys megagpt passes
    through (`deepspeed.extra` is merged into the generated DeepSpeed config)."""
    zero = "deepspeed.extra.zero_optimization."
    out = []
    if zero_stage == 3 and gpus > gpus_per_node:
        out += [r for r in [
            {"part": "hpZ", "key": zero + "zero_hpz_partition_size", "value": gpus_per_node,
             "why": "hpZ: the backward's weight all-gather stays inside the node (+2Ψ/g bytes per GPU)"},
            {"part": "qwZ", "key": zero + "zero_quantized_weights", "value": True,
             "why": "qwZ: the forward's weight all-gather in int8, half the bytes"},
            {"part": "qgZ", "key": zero + "zero_quantized_gradients", "value": True,
             "why": "qgZ: gradients reduced in int4, a quarter of the bytes"},
        ] if r.pop("part") not in zeropp]
    if zero_stage in (1, 2) and not overlap:
        out.append({"key": zero + "overlap_comm", "value": True,
                    "why": "overlap the gradient reduction with the backward (off by default for ZeRO-1/2)"})
    if zero_stage >= 2 and accum > 1:
        out.append({"key": "train.micro_batch_size", "value": micro_batch * 2,
                    "why": "ZeRO-2/3 communicate every micro-batch: a larger micro batch means fewer per step "
                           "(if it fits: activation checkpointing on, or fewer GPUs per step)"})
    if zero_stage <= 1:
        key, value = (("train.global_batch_tokens", 2 * global_batch_tokens) if global_batch_tokens
                      else ("train.grad_accum_steps", 2 * accum))
        out.append({"key": key, "value": value,
                    "why": "ZeRO-0/1 communicate once per step: more gradient accumulation per step spreads "
                           "the same bytes over more compute (a larger batch: it changes the optimisation)"})
    return out
