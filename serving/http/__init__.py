"""The OpenAI-compatible HTTP server: protocol, app and metrics."""
