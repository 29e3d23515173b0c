"""SCLS serving engine."""
