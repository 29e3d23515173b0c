"""The OpenAI-compatible HTTP gateway and the Prometheus exporter: clients of the broker, like
the dashboard (they reach the engine only through engine.client and its stats stream)."""
