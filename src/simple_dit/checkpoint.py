"""Checkpoints: one safetensors file per run holding weights, EMA, optimiser and RNG state.

Nothing is ever unpickled: tensors live in safetensors, everything else (config, step, optimiser
hyper-parameters) in its JSON metadata. Every write goes to a temporary file in the same directory
and is renamed over the old one, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .config import RunConfig, is_number
from .errors import UserError
from .io import DirectoryLock, atomic_write
from .runtime import all_finite, is_integer, rng_state, set_rng_state

CHECKPOINT_NAME = "checkpoint.safetensors"
CONFIG_NAME = "config.json"
FINAL_GRID_NAME = "samples.png"  # the run's last grid (in a comparison's runs, its last evaluation point's)


def _optimizer_to_flat(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    # The names, so that a file missing some (damaged, or edited) is not read as a fresh optimiser.
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars, "tensors": sorted(tensors)}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def save_checkpoint(
    run_dir: Path,
    *,
    config: RunConfig,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
) -> Path:
    path = Path(run_dir) / CHECKPOINT_NAME
    atomic_write(path, lambda tmp: write_checkpoint_file(tmp, config=config, model=model, ema=ema, optimizer=optimizer, train_state=train_state))
    return path


def write_checkpoint_file(path: str, *, config: RunConfig, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          train_state: dict) -> None:  # fmt: skip
    """The checkpoint written to ``path`` as it stands (``save_checkpoint`` moves it into place)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
    tensors |= opt_tensors
    # The generators the run draws from: the CPU's, and its own GPU's (not cuda:0's, and no CUDA
    # context for a CPU run on a GPU machine).
    tensors["rng.cpu"], device_rng = rng_state(_device_of(model))
    if device_rng is not None:
        tensors["rng.cuda"] = device_rng
    # One copy each, contiguous, owning its memory (safetensors refuses tensors that share it); a
    # GPU tensor's copy to the CPU is that copy.
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in tensors.items()}
    metadata = {
        "format": "simple-dit/1",
        "config": json.dumps(config.to_dict()),
        "train_state": json.dumps(train_state),
        "optimizer": json.dumps(opt_meta),
    }
    _save_file(tensors, path, metadata)


def _save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:  # a full disk or a file-size limit: report it as the I/O error it is
        raise OSError(str(e).replace("Error while serializing: ", "")) from None


def check_not_inside_a_run(out_dir: str | os.PathLike) -> None:
    """A UserError where ``out_dir`` lies inside a training run (its samples/ or tb/, say): the
    run's own files and what is written there would mix."""
    enclosing = next((d for d in Path(out_dir).resolve().parents if (d / CHECKPOINT_NAME).is_file()), None)
    if enclosing is not None:
        raise UserError(f"--out {out_dir} is inside the training run {enclosing}; choose a directory outside it")


NOT_YET_CHECKPOINTED = "it has written no checkpoint yet: wait for its first one"


def checkpoint_path(run_dir_or_file: str | os.PathLike) -> Path:
    from .compare.runner import SETTINGS_NAME

    p = Path(run_dir_or_file)
    if p.is_dir() and (p / SETTINGS_NAME).is_file():
        raise UserError(f"{p} is a comparison, not a run; its runs are the directories in {p / 'runs'}")
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a checkpoint; restore the run's checkpoint file there")
    if not p.is_file():
        DirectoryLock.check_free(p.parent, NOT_YET_CHECKPOINTED)  # a run training now, before its first checkpoint
        raise UserError(f"no checkpoint at {p}; train a model there first (simple-dit train --out DIR)")
    return p


def _open(path: Path):
    from safetensors import safe_open

    try:
        open(path, "rb").close()  # safetensors says "No such file" of an unreadable one
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        meta = handle.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        reason = str(e).splitlines()[0]
        if path.name != CHECKPOINT_NAME:  # a file named by hand: more likely not a checkpoint at all
            raise UserError(f"{path} is not a simple-dit checkpoint or export ({reason})") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({reason}); restore it or train again") from None
    if meta.get("format") != "simple-dit/1":
        raise UserError(f"{path} is not a simple-dit checkpoint")
    try:
        parsed = {key: json.loads(meta[key]) for key in ("config", "train_state", "optimizer")}
        if not _is_train_state(parsed["train_state"]):
            raise ValueError("bad train_state")
    except (KeyError, TypeError, ValueError):
        raise UserError(f"checkpoint {path} has damaged metadata; restore it or train again") from None
    return handle, parsed


def _is_train_state(state) -> bool:
    """A run's counters as training writes them: whole step and image counts, finite seconds, and
    the logging window open at the checkpoint and whether compiled (absent from older checkpoints)."""
    return (
        isinstance(state, dict) and set(state) - {"open_window", "compiled"} == {"step", "images_seen", "train_seconds"}
        and _are_counts(state, ("step", "images_seen")) and _are_finite(state, ("train_seconds",))
        and _is_open_window(state.get("open_window", {})) and isinstance(state.get("compiled", False), bool)
    )  # fmt: skip


def _is_open_window(window) -> bool:
    """{} or the sums of a logging window of at least one step (train._Window.saved)."""
    return isinstance(window, dict) and (
        not window
        or set(window) == {"steps", "images", "seconds", "lr", "loss_sum", "grad_norm_sum"} and window["steps"] != 0
        and _are_counts(window, ("steps", "images")) and _are_finite(window, ("seconds", "lr", "loss_sum", "grad_norm_sum"))
    )  # fmt: skip


def _are_counts(record: dict, keys) -> bool:
    return all(is_integer(record[key]) and record[key] >= 0 for key in keys)


def _are_finite(record: dict, keys) -> bool:
    """Finite and not negative: seconds, a learning rate, sums of losses and gradient norms."""
    return all(is_number(record[key]) and math.isfinite(record[key]) and record[key] >= 0 for key in keys)


def _read(handle, path: Path, prefix: str) -> dict[str, torch.Tensor]:
    try:
        return {k[len(prefix) :]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}); restore it or train again") from None


def read_config_json(run_dir: str | os.PathLike) -> RunConfig:
    """The config.json a run's training wrote beside its checkpoint (json's ValueError where it is
    not JSON, a UserError where it is not a run's config)."""
    return RunConfig.from_dict(json.loads((Path(run_dir) / CONFIG_NAME).read_text()))


def load_config(run_dir_or_file) -> RunConfig:
    path = checkpoint_path(run_dir_or_file)
    _, meta = _open(path)
    return RunConfig.from_dict(meta["config"])


def load_weights(run_dir_or_file, use_ema: bool = True) -> tuple[RunConfig, dict[str, torch.Tensor], dict]:
    """The config, one set of weights (EMA or raw) and the training state of a checkpoint."""
    path = checkpoint_path(run_dir_or_file)
    handle, meta = _open(path)
    weights = _read(handle, path, "ema." if use_ema else "model.")
    return RunConfig.from_dict(meta["config"]), weights, meta["train_state"]


def largest_weight_difference(run_a, run_b, *, use_ema: bool = False) -> float:
    """The largest absolute difference between the weights (and buffers) two runs checkpointed:
    0 where two runs repeat each other bit for bit."""
    a, b = load_weights(run_a, use_ema=use_ema)[1], load_weights(run_b, use_ema=use_ema)[1]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def weights_mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``model.load_state_dict(weights)`` from working, in a few words naming the first
    tensor missing, unexpected or of another shape (PyTorch's own message takes many lines, the
    first of them naming nothing); None where it would load."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    reshaped = [name for name in expected if name in weights and tuple(weights[name].shape) != tuple(expected[name].shape)]
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if unexpected:
        return f"{unexpected[0]} is no tensor of this network" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
    if reshaped:
        name = reshaped[0]
        return f"{name} is {tuple(weights[name].shape)}, the network's {tuple(expected[name].shape)}"
    return None


def load_training_state(run_dir: Path, model, ema, optimizer) -> dict:
    """Restore everything a run needs to continue exactly; returns the saved train_state."""
    path = checkpoint_path(run_dir)
    handle, meta = _open(path)
    for module, prefix in ((model, "model."), (ema, "ema.")):
        weights = _read(handle, path, prefix)
        problem = weights_mismatch(module, weights)
        if problem:
            raise UserError(f"checkpoint {path} does not match this model: {prefix}{problem}")
        module.load_state_dict(weights)
    if not all_finite([*model.parameters(), *ema.parameters()]):
        # Training checks the loss before every save, so these are damaged weights, not a divergence.
        raise UserError(f"checkpoint {path} holds non-finite weights: it is damaged; restore it or train again")
    # Which kernel computes the update is this machine's choice, not the run's: a run trained
    # with the fused CPU AdamW (PyTorch >= 2.4) resumes on a PyTorch without it, and one trained
    # without it resumes fused. The flags go into the saved groups before loading, because loading
    # places each step counter by them: a counter loaded as unfused stays on the CPU, where CUDA's
    # fused kernel refuses it.
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    moments = _read(handle, path, "optim.")
    listed = meta["optimizer"].get("tensors") if isinstance(meta["optimizer"], dict) else None  # absent from older checkpoints
    if isinstance(listed, list) and sorted(f"optim.{name}" for name in moments) != sorted(listed):
        raise UserError(f"checkpoint {path} lacks part of its optimiser state: it is damaged; restore it or train again")
    try:
        saved = _optimizer_from_flat(moments, meta["optimizer"])
        for group, kernel in zip(saved["param_groups"], kernels):
            group.update(kernel)
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint {path} has an optimiser state that does not match this model ({str(e).splitlines()[0]})") from None
    if not all_finite(t for moments in optimizer.state.values() for t in moments.values() if torch.is_tensor(t)):
        # As for the weights: no save follows a non-finite loss, so these moments were damaged since.
        raise UserError(f"checkpoint {path} holds a non-finite optimiser state: it is damaged; restore it or train again")
    _match_parameter_layouts(optimizer)
    rng = _read(handle, path, "rng.")
    try:
        device = _device_of(model)
        # A run moved from a GPU to the CPU leaves the GPU's state behind; one moved onto a GPU
        # starts that GPU's generator where it is.
        set_rng_state((rng["cpu"], rng.get("cuda") if device.type == "cuda" else None), device)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} has a damaged RNG state ({e}); restore it or train again") from None
    return meta["train_state"]


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each moment tensor its parameter's memory layout again. Checkpoints store contiguous
    tensors; the fused AdamW walks a parameter and its moments as flat memory, so a channels-last
    UNet weight updated with contiguous moments mixes up its elements and the resumed run departs
    from the straight one."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            moments = optimizer.state.get(p, {})
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    moments[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
