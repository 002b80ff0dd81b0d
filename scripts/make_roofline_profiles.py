"""Write the GPU cost profiles serving/scheduling/profiles/{h100,h200}.json from the roofline formula.

No GPU was available to measure them: every entry is `serving.scheduling.cost_model.roofline_step_cost`
(peak HBM bandwidth and tensor-core FLOPs scaled by one efficiency factor, a fixed launch overhead,
NVLink all-reduces for tensor parallelism) for Llama-3-8B and Llama-3-70B at every precision preset
and TP 1, 2, 4, 8. Each entry's meta gives the bytes it was derived from and whether the weights
fit on one device. Replace a file with `python -m serving.sim.profiler ... --device-kind h100` output
measured on the GPU when one is available.

    .venv/bin/python scripts/make_roofline_profiles.py [--efficiency 0.6] [--out-dir serving/scheduling/profiles]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from models.precision import PRESETS, resolve_precision
from serving.scheduling.cost_model import (
    DEFAULT_EFFICIENCY,
    FEATURES_DOC,
    H100,
    H200,
    PROFILE_DIR,
    ROOFLINE_MODELS,
    DeviceProfile,
    DeviceSpec,
    roofline_step_cost,
    variant_key,
)

PRECISIONS = ("bf16", "w8a8", "fp8", "w4a16", "w4a8kv4")
TP_SIZES = (1, 2, 4, 8)
SHAPE_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size", "tie_word_embeddings")


def roofline_profile(device: DeviceSpec, efficiency: float = DEFAULT_EFFICIENCY) -> DeviceProfile:
    entries, info = {}, {}
    for name, config in ROOFLINE_MODELS.items():
        for precision in PRECISIONS:
            for tp in TP_SIZES:
                key = variant_key(name, precision, tp)
                cost = roofline_step_cost(config, precision, device, tp, efficiency=efficiency)
                weights = resolve_precision(precision).weight_bytes(config)
                entries[key] = cost
                info[key] = {
                    "weight_bytes": weights,
                    "weight_bytes_per_device": weights / tp,
                    "kv_bytes_per_token": resolve_precision(precision).kv_bytes_per_token(config),
                    "weights_fit_device": weights / tp < device.memory_bytes,
                    "ttft_903_seconds": cost.ttft_seconds(903),
                    "decode_batch1_ctx1024_seconds": cost.decode_seconds([1024]),
                    "decode_batch64_ctx1024_seconds": cost.decode_seconds([1024] * 64),
                }
    source = (f"roofline (not measured): derived from the roofline formula "
              f"(serving/scheduling/cost_model.py roofline_step_cost, efficiency {efficiency} of peak bandwidth and "
              f"FLOPs, launch overhead {device.launch_overhead_s * 1e6:.0f} us per step, NVLink "
              f"{device.link_bytes_per_s / 1e9:.0f} GB/s all-reduce with "
              f"{device.allreduce_latency_s * 1e6:.0f} us latency); no GPU was available to measure it")
    meta = {"device": dataclasses.asdict(device), "efficiency": efficiency, "features": FEATURES_DOC,
            "precisions": {p: {"weights": PRESETS[p].weight_format,
                               "math": PRESETS[p].activation_format or "bf16",
                               "kv": PRESETS[p].kv_format} for p in PRECISIONS},
            "shapes": {name: {"name": name, **{f: getattr(c, f) for f in SHAPE_FIELDS}}
                       for name, c in ROOFLINE_MODELS.items()},
            "generator": "scripts/make_roofline_profiles.py",
            "entries": info}
    return DeviceProfile(device.kind, source, entries, meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY)
    ap.add_argument("--out-dir", default=str(PROFILE_DIR), help="default: the profiles the package ships")
    args = ap.parse_args(argv)
    for device in (H100, H200):
        path = Path(args.out_dir) / f"{device.kind}.json"
        profile = roofline_profile(device, args.efficiency)
        profile.save(path)
        c = profile.get("llama3-8b", "bf16")
        print(f"{path}: {len(profile.entries)} entries; llama3-8b/bf16/tp1 TTFT(903) "
              f"{c.ttft_seconds(903) * 1e3:.1f} ms, decode 64 x 1024 {c.decode_seconds([1024] * 64) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
