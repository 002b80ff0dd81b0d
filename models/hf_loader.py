"""Load an HF checkpoint directory: config.json + safetensors (one file or a sharded index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from models.config import ModelConfig
from models.errors import ModelConfigError, WeightsError


def read_hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{model_dir} has no config.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    return ModelConfig.from_hf_dict(data)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is malformed: {e!r}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"sharded checkpoint {model_dir} is missing shard(s): {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightsError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def read_hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"cannot read weights from {path}: {e}") from None
    return weights
