"""simple-dit: class-conditional DiT and UNet diffusion models on MNIST-scale images."""

import importlib
import importlib.util

__version__ = "0.1.0"

# Every public name, and the module that defines it. They are imported on first use, so that
# `import simple_dit` (and the command line's entry point, simple_dit.launch) does not import
# PyTorch, which takes a second or more.
_PUBLIC = {
    "PRESETS": "config", "DiTConfig": "config", "RunConfig": "config", "TrainConfig": "config", "UNetConfig": "config",
    "get_preset": "config", "DiffusionConfig": "diffusion", "GaussianDiffusion": "diffusion", "UserError": "errors",
    "build_model": "models", "Pipeline": "sample",
}  # fmt: skip
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # simple_dit.config etc. after a bare `import simple_dit`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
