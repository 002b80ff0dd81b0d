"""Two-level scheduling (FineServe, arXiv 2509.06261): per device, admission and the step policy
between models; across devices, the cost model, replica planning, placement and re-planning.
Design notes: docs/scheduling.md."""
