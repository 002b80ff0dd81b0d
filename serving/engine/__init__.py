"""Engine core: requests, scheduling of one model's batch, pages, the jitted model runner."""
