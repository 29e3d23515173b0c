"""The worker side: model loading, the batched runner, the executor loop and the KV store.

Map: model_loader (weights, GGUF conversion cache) -> runner (ragged forward passes, sampling)
with paged_attention over a kv_pool (paged KV blocks, block tables) -> executor (admission,
steps, memory guard; no I/O) with a kv_store (parked KV between slices); profiler and memory_probe feed the cost model and stats;
worker.py is the ZeroMQ loop around the executor.
"""
