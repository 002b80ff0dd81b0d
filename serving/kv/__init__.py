"""KV Slab (FineServe, arXiv 2509.06261): the shared device pool, slab geometry, the slab allocator
and pool plans. Design notes: docs/kv_slab.md."""
