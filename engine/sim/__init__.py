"""The simulator: the real broker core and policies driving simulated workers (worker.py, kv.py)
with device models (devices.py) in one discrete-event loop (cluster.py). See docs/SIMULATOR.md."""
