"""segdiff: segmentation-guided diffusion for medical images (Konz et al., MICCAI 2024), faster and safer."""

from .errors import ArgumentError, CheckpointError, ConfigError, DataLayoutError, MaskError, SegdiffError

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "ConfigError",
    "DataLayoutError",
    "MaskError",
    "SegDiffPipeline",
    "SegdiffError",
]


def __getattr__(name):
    # The pipeline pulls in torch and diffusers; `python -m segdiff.phantoms` should not wait for them.
    if name == "SegDiffPipeline":
        from .model.pipeline import SegDiffPipeline

        return SegDiffPipeline
    raise AttributeError(f"module 'segdiff' has no attribute {name!r}")
