"""Two-level scheduling: admission, step policy, cost model, global placement."""
