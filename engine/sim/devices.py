"""Device models for simulated workers: how long one step takes, what KV a worker holds, and the
time model it announces. Two kinds: a profile a real worker fitted (its cached JSON), or a
roofline of a named GPU serving a named model. Figures and assumptions: docs/SIMULATOR.md."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config import DEFAULT_KV_BUDGET_BYTES
from engine.cost_model import TimeModel

GIB = 1024**3
# A worker's host tier for offloaded KV unless told otherwise (the worker's own default,
# engine/worker/kv_setup.py, which imports torch and so cannot be imported here).
HOST_KV_BUDGET_BYTES = 2 * GIB


class DeviceModelError(ValueError):
    """A --device-model that cannot be used; the message says what to pass."""


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """Datasheet figures (dense, no sparsity) and the fractions of them a serving step reaches."""

    name: str
    hbm_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float
    pcie_bytes_per_s: float  # host <-> device copies (restore, offload)
    nvlink_bytes_per_s: float  # per direction, for tensor-parallel all-reduces
    mem_efficiency: float = 0.80  # achieved / peak HBM bandwidth in a decode step
    flops_efficiency: float = 0.60  # achieved / peak tensor FLOPs in large matmuls
    step_overhead_s: float = 0.004  # per step: launches, sampling, the engine's Python


GPUS: dict[str, GPUSpec] = {
    "a100-80gb": GPUSpec("a100-80gb", 80 * 10**9, 2.039e12, 312e12, 25e9, 300e9),
    "h100-80gb": GPUSpec("h100-80gb", 80 * 10**9, 3.35e12, 989e12, 50e9, 450e9),
    "h200": GPUSpec("h200", 141 * 10**9, 4.8e12, 989e12, 50e9, 450e9),
}


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    """What a roofline needs of a decoder-only transformer (Llama-style, grouped-query attention)."""

    name: str
    num_params: float
    num_layers: int
    hidden: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    max_context_len: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return int(self.num_params * self.dtype_bytes)


MODELS: dict[str, ModelGeometry] = {
    "llama-2-7b": ModelGeometry("llama-2-7b", 6.74e9, 32, 4096, 32, 128, 32000, 4096),
    "llama-3-8b": ModelGeometry("llama-3-8b", 8.03e9, 32, 4096, 8, 128, 128256, 8192),
    "llama-2-70b": ModelGeometry("llama-2-70b", 68.98e9, 80, 8192, 8, 128, 32000, 4096),
    # The engine's embedded model in float32, for profiles measured on this machine.
    "smollm2-135m": ModelGeometry("smollm2-135m", 134.5e6, 30, 576, 3, 64, 49152, 8192, 4),
}

#: The fewest tokens of KV a simulated GPU instance must hold (one request of a few tokens).
MIN_KV_TOKENS = 64

#: Shapes a simulated GPU worker "profiles" to fit the time model it announces (a real worker
#: times its own PREFILL_GRID / DECODE_GRID; a GPU runs far larger batches, so larger shapes).
PROFILE_PREFILL = ((1, 16), (1, 128), (1, 512), (1, 2048), (4, 256), (8, 512), (16, 128))
PROFILE_DECODE = tuple((n, c) for n in (1, 8, 32, 128, 256) for c in (128, 512, 2048))


@dataclass(frozen=True, slots=True)
class StepShape:
    """One forward: decode rows (their contexts after the step, summed) and prefill chunks
    ((tokens already in KV, tokens fed) each)."""

    num_decode: int
    decode_context_sum: int
    prefills: Sequence[tuple[int, int]] = ()


@dataclass(frozen=True, slots=True)
class Roofline:
    """Step time = max(FLOPs / achieved peak, bytes / achieved bandwidth) + fixed overhead, on
    one GPU or ``tp`` GPUs in tensor parallel (weights and KV heads split, two all-reduces of
    the step's activations per layer over NVLink)."""

    gpu: GPUSpec
    model: ModelGeometry
    tp: int = 1
    allreduce_latency_s: float = 8e-6

    def flops(self, shape: StepShape) -> float:
        m = self.model
        lm_head = m.vocab * m.hidden
        body = m.num_params - 2 * lm_head  # embeddings are looked up, not multiplied
        num_tokens = shape.num_decode + sum(n for _, n in shape.prefills)
        num_sampled = shape.num_decode + len(shape.prefills)
        attended = shape.decode_context_sum + sum(
            o * n + n * (n + 1) / 2 for o, n in shape.prefills
        )
        # QK^T and AV: 2 multiply-adds per head dimension per attended position per layer.
        attention = 4 * m.num_layers * m.hidden * attended
        return 2 * body * num_tokens + 2 * lm_head * num_sampled + attention

    def bytes_moved(self, shape: StepShape) -> float:
        m = self.model
        num_tokens = shape.num_decode + sum(n for _, n in shape.prefills)
        kv_read = shape.decode_context_sum + sum(o for o, _ in shape.prefills)
        return m.weight_bytes + (kv_read + num_tokens) * m.kv_bytes_per_token

    def step_s(self, shape: StepShape) -> float:
        g, tp = self.gpu, self.tp
        compute_s = self.flops(shape) / tp / (g.bf16_flops * g.flops_efficiency)
        memory_s = self.bytes_moved(shape) / tp / (g.hbm_bytes_per_s * g.mem_efficiency)
        comm_s = 0.0
        if tp > 1:
            num_tokens = shape.num_decode + sum(n for _, n in shape.prefills)
            payload = num_tokens * self.model.hidden * self.model.dtype_bytes
            ring_s = 2 * (tp - 1) / tp * payload / g.nvlink_bytes_per_s
            comm_s = 2 * self.model.num_layers * (ring_s + self.allreduce_latency_s)
        return max(compute_s, memory_s) + comm_s + g.step_overhead_s


@dataclass(frozen=True, slots=True)
class ProfileTimer:
    """Step times from a fitted time model: a decode step at the rows' mean context plus the
    prefill of the chunks fed beside it, whose fixed cost the decode step already paid (one
    forward a step)."""

    time: TimeModel

    def step_s(self, shape: StepShape) -> float:
        t = 0.0
        if shape.num_decode:
            mean_ctx = shape.decode_context_sum / shape.num_decode
            t += self.time.decode_step_s(shape.num_decode, round(mean_ctx))
        if shape.prefills:
            mean_len = sum(n for _, n in shape.prefills) / len(shape.prefills)
            t += self.time.prefill_s(len(shape.prefills), round(mean_len))
            t -= self.time.prefill[3] if shape.num_decode else 0.0
        return t


@dataclass(frozen=True, slots=True)
class SlowdownTrace:
    """How much longer than its device model an instance's steps take over time: ``factors[k]``
    for the steps that begin in ``[k * window_s, (k + 1) * window_s)`` simulated seconds, 1
    after the last window. Measured on a real worker (engine/bench/calibrate.py writes one from
    a step log: the machine's other work, replayed), or written by hand (a noisy neighbour, a
    throttled GPU)."""

    window_s: float
    factors: tuple[float, ...]

    def at(self, t: float) -> float:
        k = int(t // self.window_s)
        return self.factors[k] if 0 <= k < len(self.factors) else 1.0

    def to_json(self) -> dict:
        return {"format": "scls-slowdown-trace", "window_s": self.window_s,
                "factors": list(self.factors)}  # fmt: skip

    @classmethod
    def load(cls, path: str) -> SlowdownTrace:
        where = f"--slowdown-trace {path}"
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except OSError as exc:
            raise DeviceModelError(f"{where}: cannot read it ({exc.strerror})") from None
        except ValueError:
            raise DeviceModelError(f"{where}: not JSON") from None
        try:
            window_s, factors = float(data["window_s"]), tuple(float(f) for f in data["factors"])
        except (KeyError, TypeError, ValueError):
            raise DeviceModelError(
                f'{where}: write {{"window_s": SECONDS, "factors": [FACTOR, ...]}}'
            ) from None
        if not (window_s > 0 and all(math.isfinite(f) and f > 0 for f in factors)):
            raise DeviceModelError(f"{where}: window_s and every factor must be above 0")
        return cls(window_s, factors)


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """Everything a simulated worker is: its step timer, KV geometry and budgets, the time model
    it announces in Ready, and its KV move rates."""

    name: str
    model: str  # what it serves (every instance of a cluster serves the same model)
    timer: Roofline | ProfileTimer
    time_model: TimeModel
    kv_bytes_per_token: int
    kv_budget_bytes: int
    max_context_len: int
    copy_bytes_per_s: float
    transfer_bytes_per_s: float
    transfer_latency_s: float
    host_kv_budget_bytes: int = HOST_KV_BUDGET_BYTES
    slowdown: float = 1.0  # every step takes this many times longer than the timer says
    slowdown_trace: SlowdownTrace | None = None  # and this many times, by when it begins


def fit_roofline(roof: Roofline) -> TimeModel:
    """The time model a worker on this GPU would fit from timing the profile shapes."""
    prefill = [(n, ln, roof.step_s(StepShape(0, 0, [(0, ln)] * n))) for n, ln in PROFILE_PREFILL]
    decode = [(n, c, roof.step_s(StepShape(n, n * c))) for n, c in PROFILE_DECODE]
    return TimeModel.fit(prefill, decode)


def gpu_device(spec: str, kv_budget_bytes: int | None = None) -> DeviceModel:
    """``GPU:MODEL[:tpN]``, e.g. ``h100-80gb:llama-3-8b`` or ``a100-80gb:llama-2-70b:tp4``."""
    parts = spec.lower().split(":")
    gpu_name, model_name, *rest = [*parts, ""][:3]
    if len(parts) > 3:
        raise DeviceModelError(
            f"--device-model {spec!r}: write GPU:MODEL[:tpN], e.g. a100-80gb:llama-2-70b:tp4 "
            f"(nothing after tpN: {':'.join(parts[3:])!r})"
        )
    if gpu_name not in GPUS or model_name not in MODELS:
        raise DeviceModelError(
            f"--device-model {spec!r}: write GPU:MODEL[:tpN] with GPU one of {', '.join(GPUS)} "
            f"and MODEL one of {', '.join(MODELS)}, or the path of a worker's profile JSON"
        )
    tp_text = rest[0]
    if tp_text and not (
        tp_text.startswith("tp") and tp_text[2:].isdigit() and int(tp_text[2:]) >= 1
    ):
        raise DeviceModelError(f"--device-model {spec!r}: the third part is tpN, e.g. tp4")
    tp = int(tp_text[2:]) if tp_text else 1
    gpu, model = GPUS[gpu_name], MODELS[model_name]
    num_heads = model.hidden // model.head_dim
    if num_heads % tp:
        divisors = [str(d) for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise DeviceModelError(
            f"--device-model {spec!r}: {model.name}'s {num_heads} attention heads do not split "
            f"over {tp} GPUs: use tp{', tp'.join(divisors)}"
        )
    roof = Roofline(gpu, model, tp)
    # As vLLM's gpu_memory_utilization=0.9: 90% of HBM, less the weights and 1 GiB of
    # activations and workspace per GPU, holds KV.
    free = tp * (0.9 * gpu.hbm_bytes - GIB) - model.weight_bytes
    budget = kv_budget_bytes if kv_budget_bytes is not None else int(free)
    if kv_budget_bytes is not None and budget < model.kv_bytes_per_token * MIN_KV_TOKENS:
        raise DeviceModelError(
            f"--kv-budget {budget / 2**20:.3g}MiB holds {budget // model.kv_bytes_per_token} tokens of "
            f"{model.name}'s KV ({model.kv_bytes_per_token:,} bytes per token): give at least "
            f"{model.kv_bytes_per_token * MIN_KV_TOKENS / 2**20:.1f}MiB, or leave it out"
        )
    if budget < model.kv_bytes_per_token * MIN_KV_TOKENS:
        raise DeviceModelError(
            f"--device-model {spec!r}: {model.name} ({model.weight_bytes / 1e9:.0f} GB of weights) "
            f"leaves no room for KV on {tp} x {gpu.name}: use more GPUs (:tpN)"
        )
    return DeviceModel(
        name=f"{gpu.name}:{model.name}" + (f":tp{tp}" if tp > 1 else ""),
        model=model.name,
        timer=roof,
        time_model=fit_roofline(roof),
        kv_bytes_per_token=model.kv_bytes_per_token,
        kv_budget_bytes=budget,
        max_context_len=model.max_context_len,
        copy_bytes_per_s=gpu.pcie_bytes_per_s,
        transfer_bytes_per_s=12.5e9,  # a 100 Gb/s link between instances
        transfer_latency_s=5e-5,
        host_kv_budget_bytes=64 * GIB,
    )


def load_profile(path: str | Path, flag: str) -> TimeModel:
    """The time model of a profile JSON named by ``flag``; DeviceModelError saying why not."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DeviceModelError(f"{flag} {path}: no such file: give a profile JSON")
    if file.is_dir():
        raise DeviceModelError(f"{flag} {path}: a directory, not a profile JSON file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeviceModelError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    except ValueError:  # not JSON, or not UTF-8 text
        data = None
    time = None
    if isinstance(data, dict):  # the loader takes a JSON object (and warns of anything else)
        try:
            time = TimeModel.from_json(data)
        except (ValueError, KeyError, TypeError):
            time = None
    if time is None:
        raise DeviceModelError(
            f"{flag} {path}: not a time-model profile (a JSON object that a worker writes under "
            "~/.cache/scls-engine/profiles/; `run.py profile` makes it)"
        )
    return time


def profile_device(
    path: Path, model: str = "smollm2-135m", kv_budget_bytes: int | None = None
) -> DeviceModel:
    """A worker's cached profile (engine/cost_model.py's JSON) for ``model`` on this machine:
    KV moves at the rates measured here (docs/SCHEDULING.md)."""
    time = load_profile(path, "--device-model")
    geometry = MODELS[model]
    return DeviceModel(
        name=f"profile:{path.name}",
        model=model,
        timer=ProfileTimer(TimeModel(time.prefill, time.decode)),
        time_model=time,
        kv_bytes_per_token=geometry.kv_bytes_per_token,
        kv_budget_bytes=kv_budget_bytes or DEFAULT_KV_BUDGET_BYTES,
        max_context_len=geometry.max_context_len,
        copy_bytes_per_s=6e9,
        transfer_bytes_per_s=0.8e9,
        transfer_latency_s=1e-4,
    )


def device_model(spec: str, kv_budget_bytes: int | None = None) -> DeviceModel:
    """A ``--device-model`` value: a profile JSON path, or ``GPU:MODEL[:tpN]``."""
    path = Path(spec).expanduser()
    if spec.endswith(".json") or path.exists():
        return profile_device(path, kv_budget_bytes=kv_budget_bytes)
    return gpu_device(spec, kv_budget_bytes)


def device_models(specs: str, kv_budget_bytes: int | None = None) -> list[DeviceModel]:
    """Comma-separated specs (heterogeneous instances take them in turn)."""
    out = [device_model(s.strip(), kv_budget_bytes) for s in specs.split(",") if s.strip()]
    if not out:
        raise DeviceModelError("--device-model is empty: name a GPU:MODEL or a profile JSON")
    models = sorted({d.model for d in out})
    if len(models) > 1:
        raise DeviceModelError(
            f"--device-model mixes {' and '.join(models)}: every instance serves the same model, "
            "as every worker of one engine does"
        )
    return out
