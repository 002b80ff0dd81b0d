"""KV Slab: the shared device pool, its slab allocator and pool plans."""
