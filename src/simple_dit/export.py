"""Export: a run's EMA weights alone, in the Hugging Face layout, and loading them back.

    simple-dit export runs/mini --out exported/mini --dtype bf16

writes ``exported/mini/model.safetensors`` (the EMA weights under the model's own parameter
names, stored in the chosen dtype, with the run config and where the weights came from in the
file's metadata) and ``config.json`` (the run config): the two files of a Hugging Face model
repository. ``Pipeline.from_pretrained(DIR)``, ``simple-dit sample DIR`` and ``simple-dit eval
DIR`` load it, casting the weights back to fp32. ``--push-to-hub REPO`` uploads the directory with
huggingface_hub (the ``hub`` extra).

The package ships one such file, ``assets/default-dit-mini.safetensors``: what
``Pipeline.from_pretrained()`` and ``simple-dit sample --out FILE`` load when given no run.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, CONFIG_NAME, NOT_YET_CHECKPOINTED, _save_file, check_not_inside_a_run, load_weights, weights_mismatch
from .config import RunConfig, validate_config
from .errors import UserError
from .io import DirectoryLock, ensure_writable_dir, is_temporary, replace_set, write_json
from .models import build_model
from .runtime import all_finite, is_integer

EXPORT_FORMAT = "simple-dit-export/1"
MODEL_NAME = "model.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MODEL = "default"  # Pipeline.from_pretrained("default"): the model shipped in the package
DEFAULT_ASSET = "default-dit-mini.safetensors"
RESERVED_METADATA = ("format", "config", "dtype", "weights", "source_run", "train_state", "exported")  # what loading reads


def default_model_path() -> Path:
    return Path(str(resources.files("simple_dit") / "assets" / DEFAULT_ASSET))


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "fp32", metadata: dict[str, str] | None = None) -> Path:
    """Write ``run_dir``'s EMA weights as ``out_dir/model.safetensors`` in ``dtype`` and its
    config as ``out_dir/config.json``; ``metadata`` adds entries to the weights file's metadata.
    Returns the weights file."""
    from .compare.runner import SETTINGS_NAME
    from .evaluate import GUIDANCE_NAME, read_guidance

    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if run_dir.exists() and is_export(run_dir):
        raise UserError(f"{run_dir} is an export already: export takes a training run (copy an export to move it)")
    config, weights, state = load_weights(run_dir, use_ema=True)
    source = run_dir if run_dir.is_dir() else run_dir.parent
    if out_dir.resolve() == source.resolve():
        raise UserError(f"--out {out_dir} is the run directory itself; choose another directory")
    if (out_dir / CHECKPOINT_NAME).exists():
        raise UserError(f"--out {out_dir} holds a training run; choose another directory")
    check_not_inside_a_run(out_dir)
    if (out_dir / SETTINGS_NAME).is_file():  # loading the directory would then find the export, not the comparison
        raise UserError(f"--out {out_dir} holds a comparison; choose another directory")
    # An earlier export's files are replaced, and files of other names (a model card, samples, a
    # clone's .git) left alone; files of an export's names that are not an export's are refused.
    in_the_way = [name for name in (MODEL_NAME, CONFIG_NAME, GUIDANCE_NAME) if (out_dir / name).is_dir()]
    if in_the_way:
        raise UserError(f"--out {out_dir / in_the_way[0]} is a directory where the export writes a file; move it away")
    if not is_export(out_dir / MODEL_NAME):
        theirs = [name for name in (MODEL_NAME, CONFIG_NAME, GUIDANCE_NAME) if (out_dir / name).exists()]
        if theirs:
            raise UserError(f"--out {out_dir} holds {', '.join(theirs)} of no simple-dit export; choose another directory")
    if metadata is not None and not isinstance(metadata, dict):
        raise UserError(f"export metadata is a dict of strings to strings, got {type(metadata).__name__}")
    for key, value in (metadata or {}).items():
        if not (isinstance(key, str) and isinstance(value, str)) or key in RESERVED_METADATA:
            raise UserError(f"export metadata maps strings to strings, other than {', '.join(RESERVED_METADATA)}; got {key!r}: {value!r}")
    with torch.device("meta"):  # the shapes without the memory
        problem = weights_mismatch(build_model(config.model), weights)
    if problem:
        raise UserError(f"{run_dir}'s EMA weights do not match its config ({problem}): the checkpoint is damaged; nothing exported")
    if not all_finite(weights.values()):
        raise UserError(f"{run_dir}'s EMA weights are not all finite (a diverged or damaged checkpoint); nothing exported")
    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    if not all_finite(tensors.values()):
        raise UserError(f"{run_dir}'s weights do not fit in {dtype}; export them as bf16 or fp32")
    read_guidance(source)  # a damaged guidance.json is refused here, not copied into an export that cannot sample
    ensure_writable_dir(out_dir)
    meta = {
        "format": EXPORT_FORMAT, "config": json.dumps(config.to_dict()), "dtype": dtype, "weights": "ema",
        "source_run": source.resolve().name, "train_state": json.dumps({k: state[k] for k in ("step", "images_seen", "train_seconds")}),
        "exported": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    } | (metadata or {})  # fmt: skip
    guidance = source / GUIDANCE_NAME  # the guidance picked for the run: an export samples as its run does

    def write(staging: Path) -> None:  # with the directory locked
        # What an export killed mid-write left (older versions wrote each file through a temporary).
        for tmp in out_dir.glob(".*"):
            if is_temporary(tmp.name) and tmp.is_file():
                tmp.unlink(missing_ok=True)
        _save_file(tensors, str(staging / MODEL_NAME), meta)
        write_json(staging / CONFIG_NAME, config.to_dict())
        if guidance.is_file():  # else an earlier export's pick goes with the rest of its set
            shutil.copyfile(guidance, staging / GUIDANCE_NAME)

    # One set: an interrupted export leaves the last export whole, never one file of each.
    replace_set(out_dir, [MODEL_NAME, CONFIG_NAME, GUIDANCE_NAME], write,
                busy=f"another export is writing into {out_dir}; wait for it to finish")  # fmt: skip
    return out_dir / MODEL_NAME


def resolve_pretrained(source: str | os.PathLike | None) -> Path:
    """What ``Pipeline.from_pretrained(source)`` reads: a path as given, and for None or the name
    "default" (when no such path exists) the model shipped in the package."""
    if source is None or (str(source) == DEFAULT_MODEL and not Path(source).exists()):
        path = default_model_path()
        if not path.is_file():
            raise UserError(f"the default model {path} is missing from this installation; reinstall simple-dit or give a run directory")
        return path
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise UserError(f"a model source is a run directory, an export or a checkpoint file, got {source!r}")
    return Path(source)


def is_export(path: Path) -> bool:
    """An exported directory (model.safetensors, no training checkpoint) or an exported file (any
    other file is left to the checkpoint reader, and its errors)."""
    if path.is_dir():
        return (path / MODEL_NAME).is_file() and not (path / CHECKPOINT_NAME).exists()
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("format") == EXPORT_FORMAT
    except Exception:
        return False


def load_export(path: str | os.PathLike) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, str]]:
    """The config, fp32 weights and metadata of an export (a directory or its weights file). A
    directory's config.json is its config; a lone file carries its own in the metadata."""
    from safetensors import safe_open

    path = Path(path)
    file = path / MODEL_NAME if path.is_dir() else path
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != EXPORT_FORMAT:
                raise UserError(f"{file} is not a simple-dit export (simple-dit export RUN_DIR --out DIR writes one)")
            weights = {k: handle.get_tensor(k) for k in handle.keys()}
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise UserError(f"{file} is corrupt or truncated ({str(e).splitlines()[0]}); export it again") from None
    config_file = path / CONFIG_NAME if path.is_dir() else None
    try:
        config_dict = json.loads(config_file.read_text()) if config_file is not None else json.loads(meta["config"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{config_file or file} has no readable run config ({e}); export it again") from None
    if not isinstance(config_dict, dict):
        raise UserError(f"{config_file or file} has no readable run config; export it again")
    try:
        config = validate_config(RunConfig.from_dict(config_dict))
        if config_file is not None:  # the weights were exported with a config of their own: the two must agree
            own = RunConfig.from_dict(json.loads(meta["config"]))
            changed = [part for part in ("model", "diffusion") if getattr(own, part) != getattr(config, part)]
            if changed:
                raise UserError(f"its {' and '.join(changed)} differ from those the weights were exported with")
    except (UserError, ValueError, KeyError) as e:
        raise UserError(f"{config_file or file} is not a usable run config ({e}); export it again") from None
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return config, weights, meta


def load_pretrained(source: str | os.PathLike | None, use_ema: bool = True) -> tuple[RunConfig, dict[str, torch.Tensor], Path | None, int | None]:
    """The config and weights behind ``Pipeline.from_pretrained(source)``, the directory whose
    guidance.json applies (None for a lone file) and the training step of the weights (None where
    an export does not say)."""
    path = resolve_pretrained(source)
    try:
        path.stat()
    except FileNotFoundError:
        pass  # said below, with what to do about it
    except OSError as e:  # a name too long, a directory that may not be read
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if path.is_dir() and not (path / MODEL_NAME).exists() and not (path / CHECKPOINT_NAME).exists() and (path / CONFIG_NAME).is_file():
        DirectoryLock.check_free(path, NOT_YET_CHECKPOINTED)  # a run training now, before its first checkpoint
        raise UserError(f"{path} holds a {CONFIG_NAME} but neither an export's {MODEL_NAME} nor a run's {CHECKPOINT_NAME}: "
                        "restore the weights file, or train the run again (one stopped before its first checkpoint has none)")
    if is_export(path):
        if not use_ema:
            raise UserError(f"{path} is an export, which holds only the EMA weights; drop --no-ema (use_ema=False)")
        config, weights, meta = load_export(path)
        try:
            step = json.loads(meta["train_state"])["step"]
        except (KeyError, TypeError, ValueError):  # written by hand, or by another tool: the step is unknown
            step = None
    else:
        config, weights, state = load_weights(path, use_ema=use_ema)
        step = state["step"]
    return config, weights, (path if path.is_dir() else None), (step if is_integer(step) else None)


def require_hub():
    from .extras import require

    return require("huggingface_hub", "hub", "--push-to-hub")


def push_to_hub(out_dir: str | os.PathLike, repo: str) -> str:
    """Upload an export directory to the Hugging Face repository ``repo`` (created if needed, with
    the token of ``huggingface-cli login`` or $HF_TOKEN); returns the repository's URL."""
    hub = require_hub()
    try:
        api = hub.HfApi()
        url = api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(out_dir), repo_id=repo, repo_type="model", commit_message="simple-dit export")
    except Exception as e:  # no token, no network, a bad repository name, ...
        raise UserError(f"--push-to-hub {repo}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    return str(url)
