"""Runtimes: several models stepping over one device pool, and the asyncio front of it."""
