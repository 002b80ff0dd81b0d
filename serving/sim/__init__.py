"""Simulation and measurement: workloads (and the Azure 2023 traces in traces/), replay, metrics, the
simulator, the profiler. Design notes: docs/scheduling.md."""
