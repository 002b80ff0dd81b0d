"""Errors raised while resolving, configuring and loading a model. Each names the problem."""


class ModelLoadError(Exception):
    """A model could not be found or loaded."""


class ModelNotFoundError(ModelLoadError):
    """Neither a known model name nor an existing path."""


class ModelConfigError(ModelLoadError):
    """The config (HF config.json or GGUF metadata) is missing, malformed or unsupported."""


class WeightsError(ModelLoadError):
    """Weights are missing, malformed or do not match the config."""


class CheckpointError(ModelLoadError):
    """A quantized checkpoint written by `fineserve quantize` is missing a file, corrupt, truncated,
    inconsistent with its metadata, or of an unsupported format version."""
