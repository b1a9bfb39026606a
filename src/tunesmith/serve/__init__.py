"""Serving a tuned model: an interactive chat on stdin/stdout (an HTTP API comes later)."""
