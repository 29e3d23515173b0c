"""Engine step efficiency: tokens/s of the bare transformers decode loop against the engine's
Executor + Runner on the same model and batch shapes, and the engine's time per step outside
the forward pass. ``python -m engine.bench.step_bench --help``; results as a table and JSON.

Per shape (batch B, context C, uniform or mixed lengths): both sides prefill the same prompts
once (not timed), step twice to warm up, then run ``repeats`` windows of ``steps`` decode steps,
the two sides alternating step by step; each side reports its fastest window, and the mean and
slowest of all its timed steps. The bare loop is a model forward with a DynamicCache and a
greedy argmax, nothing else; the engine side submits one RunBatch (``--dispatch-steps`` steps
allowed) to an in-process Executor and calls ``step()`` (its public API only). The
forward time inside an engine step is taken by a thin wrapper around the Runner's forward
method (``run_model`` or ``forward``, whichever it has); without one, only the totals.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.worker.model_loader import LoadedModel

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
FORWARD_METHODS = ("run_model", "forward")  # the Runner's forward pass, newest last
WARMUP_STEPS = 2
MAX_PREFILL_TOKENS = 4096  # bare loop: prompt tokens per prefill forward


class StepBenchError(ValueError):
    """A step-benchmark option that cannot be used; the message says what to pass."""


@dataclass(frozen=True, slots=True)
class Shape:
    """``batch`` rows at ``context`` tokens each, or (``mixed``) at contexts evenly spread
    from context / 4 to context."""

    batch: int
    context: int
    mixed: bool = False

    def contexts(self) -> list[int]:
        if not self.mixed or self.batch == 1:
            return [self.context] * self.batch
        low = max(1, self.context // 4)
        return [round(low + (self.context - low) * i / (self.batch - 1)) for i in range(self.batch)]

    @property
    def label(self) -> str:
        if self.mixed and self.batch > 1:
            return f"{self.batch} x {max(1, self.context // 4)}..{self.context}"
        return f"{self.batch} x {self.context}"


def cpu_facts() -> dict[str, Any]:
    """The CPU model, its vector extensions of interest (from /proc/cpuinfo), torch's threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "vector_extensions": [f for f in CPU_FLAGS if f in flags],
        "amx": any(f.startswith("amx") for f in flags),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def load(model: str, dtype: str, device: str) -> LoadedModel:
    """ "tiny": a random-weight Llama built from a config (as the tests build theirs);
    otherwise "embedded" or a model path, loaded as the worker loads it."""
    from engine.worker.model_loader import load_model, model_info, parse_dtype

    if model != "tiny":
        return load_model(model, device, dtype)
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=0.1, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    torch_dtype = parse_dtype(dtype)
    net = LlamaForCausalLM(config).to(device=device, dtype=torch_dtype).eval()
    info = model_info("tiny", config, GenerationConfig(eos_token_id=2), torch_dtype)
    return LoadedModel(model=net, info=info, device=torch.device(device), dtype=torch_dtype)


def prompts(shape: Shape, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in shape.contexts()]


class BareLoop:
    """transformers alone: prefill once, then one forward per step with a DynamicCache and a
    greedy argmax. Uniform rows pass no mask; mixed rows are left-padded with a 2D mask."""

    def __init__(self, loaded: LoadedModel, token_lists: list[list[int]]) -> None:
        self.model, self.device = loaded.model, loaded.device
        self.tokens: list[list[int]] = [[] for _ in token_lists]
        self.forward_s = 0.0
        self._prefill(token_lists)

    @torch.inference_mode()
    def _prefill(self, token_lists: list[list[int]]) -> None:
        from transformers import DynamicCache

        width = max(len(t) for t in token_lists)
        ids = torch.zeros((len(token_lists), width), dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)  # [B, T]
        for row, tokens in enumerate(token_lists):
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        ragged = bool((mask == 0).any())
        self.mask = mask.to(self.device) if ragged else None
        self.positions = (mask.sum(-1, keepdim=True) - 1).to(self.device)  # [B, 1]
        rows_per_chunk = max(1, MAX_PREFILL_TOKENS // width)
        parts, logits = [], []
        for start in range(0, len(token_lists), rows_per_chunk):
            part, rows = (
                DynamicCache(config=self.model.config),
                slice(start, start + rows_per_chunk),
            )
            chunk_mask = mask[rows].to(self.device) if ragged else None
            positions = (mask[rows].cumsum(-1) - 1).clamp(min=0).to(self.device) if ragged else None
            out = self.model(
                input_ids=ids[rows].to(self.device),
                attention_mask=chunk_mask,
                position_ids=positions,
                cache=part,
                use_cache=True,
                logits_to_keep=1,
            )
            parts.append(part)
            logits.append(out.logits[:, -1, :])
        self.cache = DynamicCache(config=self.model.config)
        for layer in range(len(parts[0].layers)):
            keys = torch.cat([p.layers[layer].keys for p in parts])  # [B, H, T, D]
            values = torch.cat([p.layers[layer].values for p in parts])
            self.cache.update(keys, values, layer)
        self.next = torch.cat(logits).argmax(-1)  # [B]
        self._record(self.next.tolist())

    def _record(self, tokens: list[int]) -> None:
        for row, token in enumerate(tokens):
            self.tokens[row].append(token)

    @torch.inference_mode()
    def step(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.mask is not None:
            ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.device)
            self.mask = torch.cat([self.mask, ones], 1)  # [B, T+1]
            self.positions = self.positions + 1
            kwargs = {"attention_mask": self.mask, "position_ids": self.positions}
        started = time.perf_counter()
        out = self.model(input_ids=self.next[:, None], cache=self.cache, use_cache=True, **kwargs)
        _sync(self.device)
        self.forward_s += time.perf_counter() - started
        self.next = out.logits[:, -1, :].argmax(-1)  # [B]
        self._record(self.next.tolist())


class EngineLoop:
    """The engine in-process: a Runner over the model, an Executor with a budget the batch
    fits, one sequential RunBatch of greedy rows; ``step()`` is Executor.step()."""

    def __init__(
        self,
        loaded: LoadedModel,
        token_lists: list[list[int]],
        num_steps: int,
        dispatch_steps: int,
    ) -> None:
        """``num_steps``: steps that will be run (the KV budget fits them, with room to
        spare); ``dispatch_steps``: the dispatch's step budget (its slice), at least that."""
        from engine import protocol as p
        from engine.worker.executor import Executor
        from engine.worker.runner import Runner

        runner = Runner(loaded)
        self.forward_method, self._spent = _time_forward(runner, loaded.device)
        kvpt = loaded.info.kv_bytes_per_token
        # Every row's whole reservation (context + the dispatch's steps), at the longest row's
        # width (a left-padded cache needs that): all rows start, none is preempted.
        max_steps = max(num_steps + 1, dispatch_steps)  # the rows never finish while timed
        width = max(map(len, token_lists)) + max_steps + 128
        budget = len(token_lists) * width * kvpt * 5 // 4 + (1 << 20)
        self.executor = Executor(runner, budget)
        items = [
            p.BatchItem(request_id=f"r{row}", token_ids=list(tokens), num_generated=0,
                        max_steps=max_steps, max_new_tokens=max_steps,
                        sampling=p.SamplingParams(ignore_eos=True), keep_kv=False)
            for row, tokens in enumerate(token_lists)
        ]  # fmt: skip
        self.executor.submit(
            p.RunBatch(
                batch_id=1,
                items=items,
                join=False,
                predicted_s=0.0,
                predicted_peak_bytes=0,
                max_steps=max_steps,
            )
        )
        self.tokens: list[list[int]] = [[] for _ in token_lists]
        while not all(self.tokens):  # prefill (in chunks of the step's token budget) until
            self.step()  # every row has sampled its first token: then only decode steps

    @property
    def forward_s(self) -> float | None:
        return None if self._spent is None else self._spent[0]

    def step(self) -> None:
        result = self.executor.step()
        if result.generated is not None:
            for request_id, tokens in result.generated.tokens:
                self.tokens[int(request_id[1:])] += tokens
        errors = [m for m in result.released if m.reason in ("error", "preempted")]
        if errors:
            raise RuntimeError(f"the executor released {errors[0].request_id}: {errors[0]}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(runner: Any, device: torch.device) -> tuple[str | None, list[float] | None]:
    """Wrap the runner's forward method (instance attribute, so the executor calls the
    wrapper) to add up the seconds spent in it; (None, None) when it has none of
    FORWARD_METHODS."""
    for name in FORWARD_METHODS:
        method: Callable[..., Any] | None = getattr(runner, name, None)
        if callable(method):
            break
    else:
        return None, None
    spent = [0.0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            _sync(device)
            spent[0] += time.perf_counter() - started

    setattr(runner, name, timed)
    return f"Runner.{name}", spent


def _timed_step(loop: BareLoop | EngineLoop) -> tuple[float, float]:
    """(wall seconds, seconds in the forward pass; 0 when not known) of one step."""
    forward_before = loop.forward_s or 0.0
    started = time.perf_counter()
    loop.step()
    return time.perf_counter() - started, (loop.forward_s or 0.0) - forward_before


def measure(
    shape: Shape,
    models: tuple[LoadedModel, LoadedModel],
    steps: int,
    repeats: int,
    dispatch_steps: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """One shape on (bare model, engine model): ``repeats`` windows of ``steps`` steps, the
    two loops alternating step by step (so that a shared machine's other load falls on both
    alike). Fastest window: the speed each reaches; mean and slowest step over all timed
    steps: what the engine's occasional KV growth costs. Tokens/s count every row's token."""
    info = models[0].info
    token_lists = prompts(shape, info.vocab_size, seed)
    num_steps = 1 + WARMUP_STEPS + repeats * steps
    if max(map(len, token_lists)) + num_steps + 1 > info.max_context_len:
        raise StepBenchError(
            f"shape {shape.label}: contexts reach {max(map(len, token_lists)) + num_steps + 1} "
            f"tokens, the model accepts {info.max_context_len}: pass smaller --contexts or --steps"
        )
    loops = (
        BareLoop(models[0], token_lists),
        EngineLoop(models[1], token_lists, num_steps, dispatch_steps),
    )
    for _ in range(WARMUP_STEPS):
        for loop in loops:
            loop.step()
    timings: tuple[list[tuple[float, float]], ...] = ([], [])  # per step: (wall s, forward s)
    for _ in range(repeats * steps):
        for side, loop in enumerate(loops):
            timings[side].append(_timed_step(loop))
    out: dict[str, Any] = {**asdict(shape), "contexts": shape.contexts()}
    for side, name in enumerate(("bare", "engine")):
        walls = [w for w, _ in timings[side]]
        windows = [timings[side][k : k + steps] for k in range(0, len(walls), steps)]
        fastest = min(windows, key=lambda w: sum(x for x, _ in w))
        wall_s, forward_s = sum(x for x, _ in fastest), sum(f for _, f in fastest)
        out[f"{name}_tokens_per_s"] = shape.batch * steps / wall_s
        out[f"{name}_step_ms"] = wall_s / steps * 1e3
        out[f"{name}_forward_ms"] = forward_s / steps * 1e3
        out[f"{name}_overhead_ms"] = (wall_s - forward_s) / steps * 1e3
        out[f"{name}_mean_step_ms"] = sum(walls) / len(walls) * 1e3
        out[f"{name}_max_step_ms"] = max(walls) * 1e3
        out[f"{name}_windows_step_ms"] = [sum(x for x, _ in w) / steps * 1e3 for w in windows]
    out["engine_over_bare"] = out["bare_step_ms"] / out["engine_step_ms"]
    out["engine_over_bare_mean"] = out["bare_mean_step_ms"] / out["engine_mean_step_ms"]
    out["forward_method"] = loops[1].forward_method
    if out["forward_method"] is None:  # not timed: engine vs bare only
        out["engine_forward_ms"] = out["engine_overhead_ms"] = None
    out["engine_overhead_share"] = (
        None if out["engine_overhead_ms"] is None
        else out["engine_overhead_ms"] / out["engine_step_ms"]
    )  # fmt: skip
    out["same_greedy_tokens"] = loops[0].tokens == loops[1].tokens
    return out


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    """Fastest windows (tok/s, step, forward, outside it), then the mean and slowest step of
    all timed steps (bare / engine)."""
    lines = [
        "| batch x context | bare tok/s | engine tok/s | engine / bare | engine step ms | "
        "forward ms | outside forward ms | mean step ms bare / engine | slowest step ms "
        "bare / engine | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in results:
        shape = Shape(r["batch"], r["context"], r["mixed"])
        share = r["engine_overhead_share"]
        overhead = _fmt(r["engine_overhead_ms"], ".2f") + (f" ({share:.1%})" if share else "")
        lines.append(
            f"| {shape.label} | {r['bare_tokens_per_s']:.1f} | {r['engine_tokens_per_s']:.1f} | "
            f"{r['engine_over_bare']:.2f}x | {r['engine_step_ms']:.1f} | "
            f"{_fmt(r['engine_forward_ms'], '.1f')} | {overhead} | "
            f"{r['bare_mean_step_ms']:.1f} / {r['engine_mean_step_ms']:.1f} | "
            f"{r['bare_max_step_ms']:.1f} / {r['engine_max_step_ms']:.1f} | "
            f"{'yes' if r['same_greedy_tokens'] else 'no'} |"
        )
    return "\n".join(lines)


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise StepBenchError(f"{flag} {text!r}: write positive whole numbers, e.g. {flag} 1,4,16")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.bench.step_bench", description=__doc__)
    p.add_argument("--model", default="embedded", help="embedded | tiny | a model path")
    p.add_argument("--batches", default="1,4,16,32,64", help="rows per batch, comma-separated")
    p.add_argument("--contexts", default="64,256,1024", help="tokens per row, comma-separated")
    p.add_argument("--mixed", action="store_true",
                   help="also batches whose rows have contexts from C/4 to C")  # fmt: skip
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the fastest counts")
    p.add_argument("--dispatch-steps", type=int, default=64,
                   help="the engine dispatch's step budget (its slice, at least the timed "
                   "steps): the KV the engine reserves per row at admission")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every shape of the flags; returns the JSON document."""
    batches, contexts = (
        parse_ints(args.batches, "--batches"),
        parse_ints(args.contexts, "--contexts"),
    )
    if min(args.steps, args.repeats, args.threads, args.dispatch_steps) < 1:
        raise StepBenchError(
            "--steps, --repeats, --threads and --dispatch-steps must be at least 1"
        )
    torch.set_num_threads(args.threads)
    models = (load(args.model, args.dtype, args.device), load(args.model, args.dtype, args.device))
    # two copies: the runner may change its model (attention implementation, packed weights)
    shapes = [Shape(b, c) for c in contexts for b in batches]
    shapes += [Shape(b, c, True) for c in contexts for b in batches if args.mixed and b > 1]
    measure(Shape(1, 16), models, 2, 1)  # warms up both models' kernels; not reported
    results = []
    for shape in shapes:
        r = measure(shape, models, args.steps, args.repeats, args.dispatch_steps, args.seed)
        results.append(r)
        print(f"step_bench: {table([r]).splitlines()[-1]}", file=sys.stderr, flush=True)
    return {
        "command": "python -m engine.bench.step_bench " + " ".join(args.argv),
        "model": models[0].info.name,
        "dtype": args.dtype,
        "device": args.device,
        "steps": args.steps,
        "repeats": args.repeats,
        "dispatch_steps": args.dispatch_steps,
        "commit": _commit(),
        "machine": cpu_facts(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    try:
        doc = run(args)
    except StepBenchError as exc:
        print(f"step_bench: {exc}", file=sys.stderr)
        return 2
    machine = doc["machine"]
    print(
        f"{machine['cpu_model']} ({', '.join(machine['vector_extensions']) or 'no AVX2'}); "
        f"{machine['torch_threads']} torch thread(s); {doc['model']} {doc['dtype']}"
    )
    print(table(doc["results"]))
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
