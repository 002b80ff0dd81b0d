"""The OpenAI-compatible HTTP server: protocol, app and metrics. Design notes: docs/serving.md."""
