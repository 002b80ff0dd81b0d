"""Runtimes: several models stepping over one device pool, and the asyncio front of it.
Design notes: docs/serving.md."""
