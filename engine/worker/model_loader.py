"""Load a causal LM for a device and dtype, converting GGUF files once into a cached directory.

GGUF loading dequantizes every tensor (tens of seconds); the converted float32 weights and the
tokenizer are saved under the spec's cache directory (atomic rename, guarded by a file lock so
that two workers starting together convert once), and later loads read that directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models import ModelSpec, is_converted, kv_layout, resolve_model

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class UnsupportedModelError(ValueError):
    """The model or the requested dtype cannot be served by this runner; says what to change."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Facts about a loaded model that the scheduler and the runner need."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int  # bytes per element of the KV cache (the model's dtype)
    vocab_size: int  # token ids must be < vocab_size
    max_context_len: int  # tokens (max_position_embeddings)
    eos_token_ids: tuple[int, ...]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies over all layers (keys and values)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on ``device``, in ``dtype``
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise UnsupportedModelError(
            f"dtype {name!r} is not supported: pass float32 (default), bfloat16 or float16"
        ) from None


def _int_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def model_info(name: str, config, generation_config, dtype: torch.dtype) -> ModelInfo:
    """Read the KV layout, context length, vocabulary and EOS ids from a transformers config."""
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedModelError(
            f"model {name!r} has {sorted(set(layer_types))} attention layers; this runner serves "
            "full-attention decoders only (Llama, Qwen2 without sliding window, ...)"
        )
    num_layers, num_kv_heads, head_dim = kv_layout(config)
    eos: list[int] = []
    for value in (getattr(generation_config, "eos_token_id", None), config.eos_token_id):
        eos += [i for i in _int_ids(value) if i not in eos]
    return ModelInfo(
        name=name,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        vocab_size=int(config.vocab_size),
        max_context_len=int(getattr(config, "max_position_embeddings", None) or 2**31 - 1),
        eos_token_ids=tuple(eos),
    )


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF model to float32 and save it (and its tokenizer) to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    # The weights are already dequantized; only the GGUF quantizer left on the model makes
    # save_pretrained refuse ("not serializable"). This is what the quantizer itself does
    # when a quantized model is dequantized (HfQuantizer.remove_quantization_config).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs).save_pretrained(out_dir)


def ensure_converted(spec: ModelSpec) -> Path:
    """The spec's ready directory, converting its GGUF file first if needed (once per cache
    directory across processes: an exclusive file lock, a temp dir and an atomic rename)."""
    ready = spec.ready_dir()
    if ready is not None:
        return ready
    assert spec.gguf_file is not None and spec.cache_dir is not None
    cache_dir = spec.cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.parent / f"{cache_dir.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_converted(cache_dir):  # another process converted it while we waited
                return cache_dir
            log.info(
                "converting %s into %s (once; later loads read the cache)",
                spec.gguf_file,
                cache_dir,
            )
            tmp = Path(tempfile.mkdtemp(prefix=f"{cache_dir.name}.tmp-", dir=cache_dir.parent))
            try:
                _convert_gguf(spec.gguf_file, tmp)
                if cache_dir.exists():  # an incomplete leftover: nothing reads it
                    shutil.rmtree(cache_dir)
                os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not secret
                os.rename(tmp, cache_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cache_dir


def load_model(
    spec: str | ModelSpec, device: str | torch.device = "cpu", dtype: str = "float32"
) -> LoadedModel:
    """Load the model for ``device`` in ``dtype`` (sdpa attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    spec = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    torch_dtype = parse_dtype(dtype)
    directory = ensure_converted(spec)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch_dtype, attn_implementation="sdpa"
    )
    device = torch.device(device)
    model.to(device).eval()
    info = model_info(spec.name, model.config, model.generation_config, torch_dtype)
    return LoadedModel(model=model, info=info, device=device, dtype=torch_dtype)
