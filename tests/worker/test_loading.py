"""Model specs, the GGUF conversion cache (with a fake converter), model facts, profiler, probe."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.models import ModelNotFoundError, load_tokenizer, resolve_model
from engine.worker import model_loader
from engine.worker.memory_probe import probe
from engine.worker.model_loader import UnsupportedModelError, load_model, model_info, parse_dtype
from engine.worker.profiler import profile


def test_embedded_spec_finds_the_gguf_and_reads_the_cache_root_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    spec = resolve_model("embedded")
    assert spec.gguf_file is not None and spec.gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.cache_dir.parent == tmp_path / "a" / "scls-engine" / "models"
    assert spec.cache_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert spec.model_dir is None and spec.ready_dir() is None  # nothing converted there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert resolve_model("SmolLM2").cache_dir.parent == tmp_path / "b" / "scls-engine" / "models"


def test_directory_spec_and_bad_specs(tiny_model_dir, tmp_path):
    spec = resolve_model(str(tiny_model_dir))
    assert spec.model_dir == tiny_model_dir and spec.gguf_file is None
    assert spec.ready_dir() == tiny_model_dir
    (tmp_path / "notes.txt").write_text("x")
    for bad in ["no/such/model", str(tmp_path / "notes.txt"), str(tmp_path)]:
        with pytest.raises(ModelNotFoundError, match="embedded"):
            resolve_model(bad)


def test_tokenizer_from_a_directory_has_a_chat_template(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello world"}], add_generation_prompt=True, return_dict=False
    )
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nHello world<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def fake_gguf(tmp_path: Path, monkeypatch, delay_s: float = 0.0, fail: bool = False) -> list[Path]:
    """A .gguf spec whose conversion writes placeholder files; returns the list of conversions."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    calls: list[Path] = []

    def convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(delay_s)
        if fail:
            raise RuntimeError("conversion failed")
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(model_loader, "_convert_gguf", convert)
    return calls


def test_concurrent_loads_convert_once(tmp_path, monkeypatch):
    calls = fake_gguf(tmp_path, monkeypatch, delay_s=0.2)
    spec = resolve_model(str(tmp_path / "m.gguf"))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(model_loader.ensure_converted(spec)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [spec.cache_dir] * 3
    assert resolve_model(str(tmp_path / "m.gguf")).model_dir == spec.cache_dir
    leftovers = [p.name for p in spec.cache_dir.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    fake_gguf(tmp_path, monkeypatch, fail=True)
    spec = resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(RuntimeError, match="conversion failed"):
        model_loader.ensure_converted(spec)
    assert [p.suffix for p in spec.cache_dir.parent.iterdir()] == [".lock"]


def test_model_facts_of_the_tiny_model(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="bfloat16")
    info = loaded.info
    assert (info.num_layers, info.num_kv_heads, info.head_dim, info.dtype_bytes) == (2, 2, 16, 2)
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert info.eos_token_ids == (2,) and info.vocab_size == 512 and info.max_context_len == 2048
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_unsupported_dtype_and_sliding_window_models(tiny_loaded):
    with pytest.raises(UnsupportedModelError, match="float32"):
        parse_dtype("int8")
    config = copy.deepcopy(tiny_loaded.model.config)
    config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="full-attention"):
        model_info("x", config, None, torch.float32)


def test_profile_of_the_tiny_model_is_quick(runner):
    started_at = time.perf_counter()
    seen: list[tuple[int, int]] = []
    prefill, decode = profile(runner, on_progress=lambda done, total: seen.append((done, total)))
    assert time.perf_counter() - started_at < 10
    assert len(prefill) >= 6 and len(decode) >= 10
    assert seen == [(i, len(prefill) + len(decode)) for i in range(1, len(seen) + 1)]
    assert len(seen) == len(prefill) + len(decode)
    assert all(n >= 1 and length >= 1 and s > 0 for n, length, s in prefill + decode)
    assert {n for n, _, _ in decode} >= {1, 32}


def test_probe_never_raises():
    used, total, util = probe("cpu")
    assert 0 < used < total and util is not None and 0 <= util <= 100
    if not torch.cuda.is_available():
        assert probe("cuda:0") == (None, None, None)
