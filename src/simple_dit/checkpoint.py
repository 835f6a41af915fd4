"""Checkpoints: one safetensors file per run holding weights, EMA, optimiser and RNG state.

Nothing is ever unpickled: tensors live in safetensors, everything else (config, step, optimiser
hyper-parameters) in its JSON metadata. Every write goes to a temporary file in the same directory
and is renamed over the old one, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .config import RunConfig
from .errors import UserError

CHECKPOINT_NAME = "checkpoint.safetensors"
CONFIG_NAME = "config.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` only once it is complete on disk."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_writable_dir(directory: Path) -> None:
    """Fail early, with one line, if results could not be written to ``directory``."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror}") from None


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _optimizer_to_flat(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    *,
    config: RunConfig,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
) -> Path:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
    tensors |= opt_tensors
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": "simple-dit/1",
        "config": json.dumps(config.to_dict()),
        "train_state": json.dumps(train_state),
        "optimizer": json.dumps(opt_meta),
    }
    path = Path(run_dir) / CHECKPOINT_NAME
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def checkpoint_path(run_dir_or_file: str | os.PathLike) -> Path:
    p = Path(run_dir_or_file)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise UserError(f"no checkpoint at {p}; train a model there first (simple-dit train --out DIR)")
    return p


def _open(path: Path):
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        meta = handle.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise UserError(f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}); restore it or train again") from None
    if meta.get("format") != "simple-dit/1":
        raise UserError(f"{path} is not a simple-dit checkpoint")
    return handle, meta


def _read(handle, path: Path, prefix: str) -> dict[str, torch.Tensor]:
    try:
        return {k[len(prefix) :]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}); restore it or train again") from None


def load_config(run_dir_or_file) -> RunConfig:
    path = checkpoint_path(run_dir_or_file)
    _, meta = _open(path)
    return RunConfig.from_dict(json.loads(meta["config"]))


def load_weights(run_dir_or_file, use_ema: bool = True) -> tuple[RunConfig, dict[str, torch.Tensor], dict]:
    """The config, one set of weights (EMA or raw) and the training state of a checkpoint."""
    path = checkpoint_path(run_dir_or_file)
    handle, meta = _open(path)
    weights = _read(handle, path, "ema." if use_ema else "model.")
    return RunConfig.from_dict(json.loads(meta["config"])), weights, json.loads(meta["train_state"])


def load_training_state(run_dir: Path, model, ema, optimizer) -> dict:
    """Restore everything a run needs to continue exactly; returns the saved train_state."""
    path = checkpoint_path(run_dir)
    handle, meta = _open(path)
    try:
        model.load_state_dict(_read(handle, path, "model."))
        ema.load_state_dict(_read(handle, path, "ema."))
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not match this model: {str(e).splitlines()[0]}") from None
    optimizer.load_state_dict(_optimizer_from_flat(_read(handle, path, "optim."), json.loads(meta["optimizer"])))
    rng = _read(handle, path, "rng.")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads(meta["train_state"])
