"""Widgets of the dashboard: one module per panel, each fed from StatsSnapshot parts."""
