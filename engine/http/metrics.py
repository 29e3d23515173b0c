"""vLLM's request metrics (names, labels and buckets), observed by the gateway at the end of
every request it serves, from the timings the broker measured. docs/METRICS.md lists them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.client import GenerateResult

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that its dashboards' quantiles line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
SLICE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)


class RequestMetrics:
    """Counters and histograms of the requests this gateway served (one gateway's share when
    several front one broker, as each vLLM API server reports its own engine's)."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        m = ["model_name"]
        self.model_name = model_name
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of the requests served.", m, registry=registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", m, registry=registry
        ).labels(model_name)
        self.success = Counter(
            "vllm:request_success",
            "Requests that ended, by finish reason (stop, length, abort).",
            [*m, "finished_reason"],
            registry=registry,
        )
        self.ttft = self._histogram(
            registry, "vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self.itl = self._histogram(
            registry,
            "vllm:inter_token_latency_seconds",
            "Time between two generated tokens (each request's mean, once per interval).",
            ITL_BUCKETS,
        )
        self.e2e = self._histogram(
            registry,
            "vllm:e2e_request_latency_seconds",
            "From the broker's receipt to the last token.",
            LATENCY_BUCKETS,
        )
        self.queue = self._histogram(
            registry,
            "vllm:request_queue_time_seconds",
            "From the broker's receipt to the first dispatch to a worker.",
            LATENCY_BUCKETS,
        )
        self.prompt_len = self._histogram(
            registry, "vllm:request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS
        )
        self.generation_len = self._histogram(
            registry,
            "vllm:request_generation_tokens",
            "Generated tokens per request.",
            TOKEN_BUCKETS,
        )
        self.slices = self._histogram(
            registry,
            "scls:request_slices",
            "Slices that served a request.",
            SLICE_BUCKETS,
        )
        self.rejected = Counter(
            "scls:requests_rejected",
            "Requests refused, by the engine's or the gateway's error code.",
            ["code"],
            registry=registry,
        )

    def _histogram(self, registry, name: str, doc: str, buckets) -> Histogram:
        return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(
            self.model_name
        )

    def finished(self, result: GenerateResult) -> None:
        """A request that ran to its end (or was cancelled by someone else)."""
        u, t = result.usage, result.timings
        self._tokens(u.prompt_tokens, u.completion_tokens)
        reason = {"cancelled": "abort"}.get(result.finish_reason, result.finish_reason)
        self.success.labels(self.model_name, reason).inc()
        self.prompt_len.observe(u.prompt_tokens)
        self.generation_len.observe(u.completion_tokens)
        self.slices.observe(result.num_slices)
        self.e2e.observe(t.finished_s)
        self.queue.observe(t.queued_s)
        if t.first_token_s is not None:
            self.ttft.observe(t.first_token_s)
            if u.completion_tokens > 1:
                gap = max(0.0, t.finished_s - t.first_token_s) / (u.completion_tokens - 1)
                for _ in range(u.completion_tokens - 1):
                    self.itl.observe(gap)

    def aborted(self, prompt_tokens: int | None, completion_tokens: int) -> None:
        """A request whose HTTP client left: the gateway cancelled it on the engine."""
        self._tokens(prompt_tokens or 0, completion_tokens)
        self.success.labels(self.model_name, "abort").inc()

    def refused(self, code: str) -> None:
        self.rejected.labels(code).inc()

    def _tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
