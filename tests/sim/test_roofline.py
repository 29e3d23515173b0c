"""The roofline GPU models against figures computed by hand from the datasheets (docs/SIMULATOR.md)."""

from __future__ import annotations

import pytest

from engine.cost_model import TimeModel
from engine.sim.devices import (
    GPUS,
    MODELS,
    DeviceModelError,
    Roofline,
    StepShape,
    device_model,
    fit_roofline,
)

GB = 10**9
GIB = 2**30


def test_kv_bytes_per_token_from_the_model_configs() -> None:
    # 2 (K and V) x layers x KV heads x head dim x 2 bytes (bf16)
    assert MODELS["llama-2-7b"].kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524_288
    assert MODELS["llama-3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert MODELS["llama-2-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680
    assert MODELS["smollm2-135m"].kv_bytes_per_token == 46_080  # float32, as the engine's


def test_a_decode_step_of_one_row_is_bound_by_reading_the_weights() -> None:
    # H100-80GB, Llama-2-7B, one row attending 1,000 cached tokens (+1 new):
    # bytes = 6.74e9 x 2 (weights) + 1,001 x 524,288 (KV read) + 1 x 524,288 (KV written)
    #       = 13.48e9 + 525,336,576 = 14,005,336,576 B
    # at 80% of 3.35 TB/s = 2.68e12 B/s: 5.22587 ms; compute is ~0.02 ms; + 4 ms overhead.
    roof = Roofline(GPUS["h100-80gb"], MODELS["llama-2-7b"])
    shape = StepShape(num_decode=1, decode_context_sum=1001)
    assert roof.bytes_moved(shape) == pytest.approx(14_005_336_576, rel=1e-9)
    assert roof.step_s(shape) == pytest.approx(0.00522587 + 0.004, rel=1e-5)


def test_a_long_prefill_is_bound_by_compute() -> None:
    # A100-80GB, Llama-2-7B, one 2,048-token prompt in one forward:
    # matmuls 2 x (6.74e9 - 2 x 32,000 x 4,096) x 2,048 = 2 x 6,477,856,000 x 2,048
    #       = 26,533,298,176,000; LM head for the one sampled row 2 x 131,072,000 = 262,144,000;
    # attention 4 x 32 layers x 4,096 x (2,048 x 2,049 / 2) = 1,100,048,498,688;
    # total 27,633,608,818,688 FLOPs at 60% of 312 TFLOPS = 187.2e12/s: 147.615 ms;
    # memory: 13.48e9 + 2,048 x 524,288 = 14,553,741,824 B at 1.6312e12 B/s: 8.92 ms.
    roof = Roofline(GPUS["a100-80gb"], MODELS["llama-2-7b"])
    shape = StepShape(0, 0, [(0, 2048)])
    assert roof.flops(shape) == pytest.approx(27_633_608_818_688, rel=1e-9)
    assert roof.step_s(shape) == pytest.approx(0.147615 + 0.004, rel=1e-4)


def test_tensor_parallel_70b_splits_the_work_and_pays_all_reduces() -> None:
    # 4 x H100, Llama-2-70B, 64 rows at context 512: memory-bound per GPU.
    # bytes = 68.98e9 x 2 + (64 x 512 + 64) x 327,680 = 137.96e9 + 10,758,389,760
    #       = 148,718,389,760 B / 4 GPUs / 2.68e12 B/s = 13.87298 ms
    # all-reduce: 64 rows x 8,192 x 2 B = 1,048,576 B; ring 2 x 3/4 x 1,048,576 / 450e9
    #       = 3.4953 us + 8 us latency; two per layer, 80 layers: 1.83925 ms
    roof = Roofline(GPUS["h100-80gb"], MODELS["llama-2-70b"], tp=4)
    shape = StepShape(64, 64 * 512)
    assert roof.step_s(shape) == pytest.approx(0.01387298 + 0.00183925 + 0.004, rel=1e-5)


def test_kv_budget_is_the_hbm_left_after_the_weights() -> None:
    # 90% of 80 GB less 1 GiB of activations, less 13.48 GB of Llama-2-7B weights
    dev = device_model("h100-80gb:llama-2-7b")
    assert dev.kv_budget_bytes == int(0.9 * 80 * GB - GIB - 13.48 * GB)
    assert (
        dev.kv_budget_bytes // dev.kv_bytes_per_token == 109_570
    )  # tokens of KV: 57,446,258,176 B / 524,288
    h200 = device_model("h200:llama-3-8b")
    assert h200.kv_budget_bytes == int(0.9 * 141 * GB - GIB - 16.06 * GB)
    assert device_model("a100-80gb:llama-2-7b", kv_budget_bytes=GIB).kv_budget_bytes == GIB


def test_70b_needs_tensor_parallelism() -> None:
    with pytest.raises(DeviceModelError, match="tpN"):
        device_model("a100-80gb:llama-2-70b")
    assert device_model("a100-80gb:llama-2-70b:tp4").name == "a100-80gb:llama-2-70b:tp4"
    for bad in ("a100-80gb:llama-2-70b:x4", "v100:llama-2-7b", "h200"):
        with pytest.raises(DeviceModelError):
            device_model(bad)


@pytest.mark.parametrize(
    "spec", ["a100-80gb:llama-2-7b", "h100-80gb:llama-3-8b", "h200:llama-2-7b"]
)
def test_the_announced_time_model_follows_the_roofline(spec: str) -> None:
    """What the broker plans with (a fit of the linear formulas, as a worker's profile) stays
    within 10% of the roofline on decode shapes between the profiled ones."""
    dev = device_model(spec)
    roof = dev.timer
    assert isinstance(roof, Roofline) and isinstance(dev.time_model, TimeModel)
    fitted = fit_roofline(roof)
    for n, c in [(3, 300), (24, 1000), (64, 700), (200, 1500)]:
        true_s = roof.step_s(StepShape(n, n * c))
        assert fitted.decode_step_s(n, c) == pytest.approx(true_s, rel=0.10)


def test_faster_gpus_step_faster() -> None:
    shape = StepShape(32, 32 * 1024)
    times = [
        Roofline(GPUS[g], MODELS["llama-2-7b"]).step_s(shape)
        for g in ("a100-80gb", "h100-80gb", "h200")
    ]
    assert times[0] > times[1] > times[2]


def test_a_profile_json_times_steps_with_its_coefficients(tmp_path) -> None:
    """A worker's cached profile as a device: one forward a step, so a mixed step pays the
    decode step's fixed cost once (hand-computed from the coefficients)."""
    prefill, decode = (2e-3, 4e-3, 0.0, 0.03, 1e-6), (4e-6, 3.5e-3, 0.0, 0.04)
    path = tmp_path / "profile.json"
    TimeModel(prefill, decode).save(path)
    dev = device_model(str(path), kv_budget_bytes=GIB // 8)
    assert dev.kv_bytes_per_token == 46_080 and dev.kv_budget_bytes == GIB // 8
    # 4 rows at mean context 100: 4e-6*400 + 3.5e-3*4 + 0.04 = 0.0556
    assert dev.timer.step_s(StepShape(4, 400)) == pytest.approx(0.0556)
    # one 200-token chunk alone: 2e-3*200 + 4e-3 + 0.03 + 1e-6*40,000 = 0.474
    assert dev.timer.step_s(StepShape(0, 0, [(0, 200)])) == pytest.approx(0.474)
    # both in one forward: 0.0556 + 0.474 - 0.03
    assert dev.timer.step_s(StepShape(4, 400, [(0, 200)])) == pytest.approx(0.4996)
