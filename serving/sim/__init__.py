"""Simulation and measurement: workloads, replay, metrics, the simulator, the profiler."""
