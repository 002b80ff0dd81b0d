"""Engine core: requests, scheduling of one model's batch, pages, sampling, the jitted model runner.
Design notes: docs/serving.md."""
