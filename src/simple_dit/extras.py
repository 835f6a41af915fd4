"""Optional dependencies: imported where a feature needs them, with a one-line hint when missing."""

from __future__ import annotations

import importlib

from .errors import UserError


def require(module: str, extra: str, feature: str):
    """``import module``, or a ``UserError`` naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"{feature} needs {package}, which is not installed: pip install 'simple-dit[{extra}]'") from None
