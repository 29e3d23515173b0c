"""The broker: a pure state machine (core) inside a ZeroMQ shell (server)."""
