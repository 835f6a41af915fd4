"""simple-dit: class-conditional DiT and UNet diffusion models on MNIST-scale images."""

from .config import PRESETS, DiTConfig, RunConfig, TrainConfig, UNetConfig, get_preset
from .diffusion import DiffusionConfig, GaussianDiffusion
from .errors import UserError
from .models import build_model

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "DiTConfig", "DiffusionConfig", "GaussianDiffusion", "Pipeline", "RunConfig",
    "TrainConfig", "UNetConfig", "UserError", "build_model", "get_preset",
]


def __getattr__(name):
    # Imported lazily so that `import simple_dit` stays cheap for the CLI's argument parsing.
    if name == "Pipeline":
        from .sample import Pipeline

        return Pipeline
    raise AttributeError(name)
