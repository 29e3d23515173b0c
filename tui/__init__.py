"""Terminal dashboard."""
