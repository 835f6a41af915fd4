"""The ``simple-dit`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import os
import re
import signal
import sys
import threading
from pathlib import Path

import torch

from .config import DEFAULT_PRESET, PRESETS, get_preset, validate_config
from .data import DATASETS
from .diffusion import DEFAULT_GUIDANCE, OBJECTIVES, SAMPLERS
from .errors import Interrupted, UserError
from .evaluate import MAX_BOOTSTRAP
from .extras import require
from .runtime import PRECISIONS, count_arg, keep_freed_memory



class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (argparse's own print the usage block first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts with a minus and a digit is a value: argparse takes only plain
        # numbers so, and read "--guidance-interval -1,2" or "--budget -5m" as a missing one.
        self._negative_number_matcher = re.compile(r"^-\.?\d")
        # A flag given twice would keep the last value without a word ("--lrs 1e-3 --lrs 3e-3"
        # sweeps one rate). Argument groups share this registry.
        for name in (None, "store", "store_true", argparse.BooleanOptionalAction):
            self.register("action", name, _given_once(self._registry_get("action", name, name)))
        self.flags_given: dict[str, str] = {}  # dest -> the flag that set it, in this parse (a subcommand's parser has its own)

    def parse_known_args(self, args=None, namespace=None):
        self.flags_given = {}
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.exit(2, f"simple-dit: error: {message} (see {self.prog} --help)\n" if _speaks() else None)


@functools.cache
def _given_once(action: type) -> type:
    def __call__(self, parser, namespace, values, option_string=None):
        earlier = parser.flags_given.get(self.dest)
        if earlier is not None:
            parser.error(f"{option_string} is given twice" if earlier == option_string else f"{earlier} and {option_string} are both given; give one")
        parser.flags_given[self.dest] = option_string
        action.__call__(self, parser, namespace, values, option_string)

    return type(f"Once{action.__name__}", (action,), {"__call__": __call__})


def _path(text: str) -> Path:
    return Path(_nonempty(text))


def _nonempty(text: str) -> str:
    """An argparse type for a name or path: an empty one (e.g. an unset shell variable) would
    otherwise mean the default, or the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run directory")
    p.add_argument("--preset", type=_nonempty, help=f"model/recipe preset (default {DEFAULT_PRESET}; see --list-presets)")
    p.add_argument("--out", required=True, type=_path, help="run directory (created)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--epochs", type=float, help="passes over the training set")
    stop.add_argument("--max-steps", type=int, help="total optimiser steps")
    stop.add_argument("--minutes", type=float, help="training time budget (sampling and checkpoints not counted)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, help="EMA decay ceiling, in [0, 1); each step's decay is min(this, (1+step)/(10+step))")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value (0 = off)")
    p.add_argument("--dataset", choices=list(DATASETS))
    p.add_argument("--objective", choices=list(OBJECTIVES), help="eps: DDPM epsilon prediction; flow: rectified-flow velocity")
    p.add_argument("--data-dir", type=_nonempty, help="directory with the IDX .gz files (default $SIMPLE_DIT_DATA, then the user cache)")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the denoiser (on one GPU the whole step replays as one CUDA graph; compiled before the clock starts, "
                        "eager if it fails); --no-compile resumes a compiled run eager")
    p.add_argument("--sample-every", type=int, help="steps between sample grids (0 = off)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0 = only at the end)")
    p.add_argument("--eval-every", type=int, help="steps between quality evaluations (FID, label accuracy, ...) logged to metrics.jsonl (0 = off)")
    p.add_argument("--eval-n", type=int, help="samples per evaluation (default 500)")
    p.add_argument("--device", type=_nonempty, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    _add_wandb(p, "one W&B run per training run; --resume continues it")
    p.add_argument("--no-progress", action="store_true")


def _add_wandb(p, what: str) -> None:
    from .logger import DEFAULT_WANDB_PROJECT

    p.add_argument("--wandb", type=_nonempty, nargs="?", const=DEFAULT_WANDB_PROJECT, metavar="PROJECT",
                   help=f"also log the config, losses, evaluations and sample grids to Weights & Biases project PROJECT "
                        f"(default {DEFAULT_WANDB_PROJECT}; {what}; WANDB_MODE=offline logs locally); needs the wandb extra")  # fmt: skip


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained run, an export, or the shipped default model")
    p.add_argument("run_dir", type=_path, nargs="?", help="a run directory or an exported one (default: the dit-mini shipped with the package)")
    p.add_argument("--out", required=True, type=_path, help="output path without extension: writes FILE.png, FILE.npz, FILE.gif")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--n", type=count_arg(1), help="number of images, classes cycled 0,1,2,...")
    count.add_argument("--per-class", type=count_arg(1), help="images per class (default 10)")
    count.add_argument("--labels", help="comma-separated class labels, e.g. 3,3,7")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: ddim for eps models, euler for flow models")
    p.add_argument("--steps", type=count_arg(1), help="denoising steps (default: 1000 ddpm, 50 ddim, 20 dpm++2m, 4 euler, 10 heun)")
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (1 = none; default: the run's guidance.json, else {DEFAULT_GUIDANCE:g})")
    p.add_argument("--guidance-interval", metavar="LO,HI", help="guide only where the path's time (0 = data, 1 = noise) is in [LO, HI] "
                   "(default: 0.3,1 for flow models, where guidance near the data changes little; 0,1 for eps models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=count_arg(1), default=250, help="images drawn at a time (default 250)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--no-gif", action="store_true", help="skip the trajectory animation")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA graphs on a GPU; on a CPU its "
                   "compilation costs more than it saves for up to ~10,000 samples)")
    p.add_argument("--device", type=_nonempty)
    p.add_argument("--precision", choices=PRECISIONS, default="auto")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a run's samples (or an ADM-style .npz) against the test split")
    p.add_argument("source", type=_path, help="a run directory (samples are drawn) or an .npz with arr_0 and labels")
    p.add_argument("--n", type=count_arg(6), help="images to draw from a run (default 5000)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--steps", type=count_arg(1))
    p.add_argument("--guidance", help="guidance scale, or a comma-separated list to score each (e.g. 1,1.5,2,3,4) and record the pick "
                   f"in RUN/guidance.json; default: the run's guidance.json, else {DEFAULT_GUIDANCE:g}")
    p.add_argument("--seed", type=int, help="the sampling seed (default 0)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--dataset", choices=list(DATASETS), help="for an .npz (default mnist); a run knows its own")
    p.add_argument("--data-dir", type=_nonempty)
    p.add_argument("--device", type=_nonempty, help="where a run's samples are drawn (default: cuda if available); the scoring runs on the CPU")
    p.add_argument("--plot", type=_path, help="write the FID against label-accuracy frontier over the guidance scales to this PNG")
    p.add_argument("--bootstrap", type=count_arg(0, MAX_BOOTSTRAP), default=None,
                   help=f"bootstrap resamples of the confidence intervals (default 200, at most {MAX_BOOTSTRAP:,}; 0 = none)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's EMA weights and config in the Hugging Face layout")
    p.add_argument("run_dir", type=_path)
    p.add_argument("--out", required=True, type=_path, help="directory for model.safetensors and config.json (created)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), fp16 or bf16: how the weights are stored; loading casts them to fp32")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the directory to this Hugging Face model repository (needs the hub extra)")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time training steps and denoiser evaluations of a preset")
    p.add_argument("--preset", type=_nonempty, default=DEFAULT_PRESET, help=f"default {DEFAULT_PRESET}")
    p.add_argument("--batch-size", type=count_arg(1), help="default: the preset's")
    p.add_argument("--what", choices=["train", "sample", "all"], default="all", help="default all")
    p.add_argument("--reference", action="store_true", help="plain fp32 eager path of the same architecture")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--repeats", type=count_arg(1), default=5, help="timings (the median is reported; default 5); on a GPU each times 10 calls back to back")
    p.add_argument("--compile", action="store_true", help="time the torch.compile'd step (on a GPU replayed as one CUDA graph, as training "
                   "runs it) and forward (compile time reported apart)")
    p.add_argument("--runs-together", type=count_arg(1), default=1, metavar="K",
                   help="time K models training together as one batched network (compare --runs-together); images/s of all K")
    p.add_argument("--device", type=_nonempty)


def _add_compare(sub) -> None:
    from .compare import DEFAULT_LRS

    p = sub.add_parser("compare", help="train presets at several learning rates for the same budget and write a report")
    p.add_argument("--presets", help="comma-separated presets, e.g. unet-seed,dit-seed (required unless --report-only)")
    p.add_argument("--budget", help="per run: training time (90s, 10m, 1h), images (200k-images) or FLOPs (1e15-flops) (required unless --report-only)")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS), help="comma-separated learning rates (default 1e-4,3e-4,1e-3)")
    p.add_argument("--out", required=True, type=_path, help="report directory (created; rerun with the same --out to resume)")
    p.add_argument("--eval-every-frac", type=float, default=0.25, help="evaluate every this fraction of the budget (default 0.25)")
    p.add_argument("--eval-n", type=count_arg(6), default=1000, help="samples per evaluation (default 1000)")
    p.add_argument("--steps", type=count_arg(1), default=20, help="sampler steps of the evaluation samples (default 20)")
    p.add_argument("--sampler", choices=sorted(set(SAMPLERS)), help="default: ddim for eps models, euler for flow models")
    p.add_argument("--guidances", default=f"{DEFAULT_GUIDANCE:g}",
                   help=f"comma-separated classifier-free guidance scales, each scored at every evaluation point (default {DEFAULT_GUIDANCE:g})")
    p.add_argument("--objective", help="comma-separated objectives (eps,flow) overriding each preset's own (default: each preset's own)")
    p.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    p.add_argument("--data-dir", type=_nonempty, help="directory with the IDX .gz files (default $SIMPLE_DIT_DATA, then the user cache)")
    p.add_argument("--seeds", help="comma-separated training and sampling seeds, each its own run (default 0)")
    p.add_argument("--seed", type=int, help="one seed (the same as --seeds SEED)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--final-n", type=count_arg(0), help="score the runs of each preset's best lr again, at its picked guidance, "
                   "on this many fresh samples (e.g. 5000): the report's confirmed table and verdict (default: the comparison's own "
                   "when it continues one, else 0: none)")
    p.add_argument("--compile", action="store_true", help="train every run with torch.compile (CUDA graphs on a GPU)")
    p.add_argument("--runs-together", type=count_arg(1), default=1, metavar="K",
                   help="train up to K runs of the same preset and objective at once, as one batched network, so that small "
                   "models fill a GPU (budgets of images or FLOPs only; default 1: one run at a time)")
    p.add_argument("--device", type=_nonempty, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--report-only", action="store_true", help="train and score nothing: rewrite --out's report from the runs it holds "
                   "now, under its own settings (e.g. an interim report of a grid's records while the grid goes on elsewhere)")
    _add_wandb(p, "one W&B run per training run, grouped under the name of --out")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web page to sample a run and see its training curves, or to show a compare report")
    p.add_argument("run_dir", type=_path, nargs="?", help="a run directory, an export, or a `simple-dit compare` output directory "
                   "(shows its report); default: the model shipped in the package")
    p.add_argument("--host", default="127.0.0.1", type=_nonempty, help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", type=_nonempty, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simple-dit", description=__doc__)
    parser.add_argument("--list-presets", action="store_true", help="print the presets with parameters and GFLOPs")
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_compare(sub)
    _add_serve(sub)
    _add_export(sub)
    return parser


def list_presets() -> str:
    from .models import parameters_and_gflops

    rows = ["| preset | model | params (M) | GFLOPs / image (fwd) | lr | batch | description |", "|---|---|---|---|---|---|---|"]
    for name, cfg in PRESETS.items():
        m = cfg.model
        params, gflops = parameters_and_gflops(m)
        shape = (
            f"DiT p{m.patch_size} d{m.hidden_size} x{m.depth} h{m.num_heads}" if m.arch == "dit"
            else f"UNet {'-'.join(map(str, m.channels))}"
        )  # fmt: skip
        rows.append(
            f"| {name} | {shape} | {params / 1e6:.2f} | {gflops:.3f} "
            f"| {cfg.train.lr:g} | {cfg.train.batch_size} | {cfg.description} |"
        )
    return "\n".join(rows)


def cmd_train(args) -> None:
    from .checkpoint import FINAL_GRID_NAME, load_config
    from .train import RESUME_FIXED, made_a_process_group, train

    overrides = {
        k: getattr(args, k)
        for k in ("lr", "batch_size", "warmup_steps", "ema_decay", "grad_clip", "dataset", "seed", "precision", "compile",
                  "sample_every", "checkpoint_every", "eval_every", "eval_n")
        if getattr(args, k) is not None
    }  # fmt: skip
    if args.objective is not None:
        overrides["objective"] = args.objective
    if args.resume:
        # The command that started the run, plus --resume, continues it: what it trains must match
        # the checkpoint (train.RESUME_FIXED), how it is run and watched may change.
        config = load_config(args.out)
        saved = {"preset": config.preset, "objective": config.diffusion.objective} | {k: getattr(config.train, k) for k in RESUME_FIXED}
        given = overrides | ({"preset": args.preset} if args.preset is not None else {})
        changed = [k for k in saved if k in given and given[k] != saved[k]]
        if changed:
            raise UserError("--resume continues the saved recipe; drop "
                            + ", ".join(f"--{k.replace('_', '-')} (the run's is {saved[k]})" for k in changed))  # fmt: skip
        overrides.pop("objective", None)
        config.train = dataclasses.replace(config.train, **overrides)
    else:
        config = get_preset(args.preset or DEFAULT_PRESET)
        if "objective" in overrides:
            config.diffusion.objective = overrides.pop("objective")
        config.train = dataclasses.replace(config.train, **overrides)
    for name in ("epochs", "max_steps", "minutes"):  # an explicit stop of 0 stops nothing
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    # A new stopping rule replaces the old one, so `--resume --max-steps 40` extends a 20-step run.
    if args.epochs is not None or args.max_steps is not None or args.minutes is not None:
        config.train.epochs = args.epochs or config.train.epochs
        config.train.max_steps = args.max_steps or 0
        config.train.minutes = args.minutes or 0.0
    if args.wandb is not None:
        require("wandb", "wandb", "--wandb")  # before any data is read
    path = train(validate_config(config), args.out, resume=args.resume, data_dir=args.data_dir, device=args.device,
                 progress=not args.no_progress, wandb=args.wandb)  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 wrote them
        print(f"checkpoint: {path}\nsamples: {args.out / FINAL_GRID_NAME}")
    if made_a_process_group() and torch.distributed.is_initialized():  # train's, under torchrun (a caller's own stays the caller's)
        torch.distributed.destroy_process_group()  # NCCL warns at exit about a group left alive


def _refuse_a_file_of_a_run(png: Path, flag: str) -> None:
    """A UserError where ``png`` is a grid a run writes (final, periodic or an evaluation point's)
    or a figure of a comparison's report: writing over it would lose it without a word."""
    from .checkpoint import CHECKPOINT_NAME, CONFIG_NAME, FINAL_GRID_NAME
    from .compare.runner import SETTINGS_NAME

    def is_run(d: Path) -> bool:  # a comparison's finished runs keep their config, not their weights
        return (d / CHECKPOINT_NAME).is_file() or (d / CONFIG_NAME).is_file()

    parent = png.parent
    owner = ("the run's own final grid" if png.name == FINAL_GRID_NAME and is_run(parent)
             else "one of the run's grids" if parent.name in ("samples", "eval_samples") and is_run(parent.parent)
             else "a figure of the comparison's report" if png.exists() and (parent / SETTINGS_NAME).is_file() else None)  # fmt: skip
    if owner:
        raise UserError(f"{flag} {png} is {owner}; choose another file")


def cmd_sample(args) -> None:
    from .diffusion import check_guidance_interval
    from .io import ensure_writable_dir, replace_set
    from .sample import Pipeline, check_image_count, save_gif, save_npz

    if args.out.is_dir():
        raise UserError(f"--out names the files to write (FILE gives FILE.png, FILE.npz, FILE.gif), not a directory: {args.out}")
    if args.out.suffix.lower() in (".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy", ".pt"):
        raise UserError(f"sample writes PNG, NPZ and GIF files: --out {args.out} would give {args.out}.png; name them without {args.out.suffix}")
    interval = None if args.guidance_interval is None else check_guidance_interval(args.guidance_interval, "--guidance-interval")
    pipe = Pipeline.from_pretrained(args.run_dir, use_ema=not args.no_ema, device=args.device, precision=args.precision, compile=args.compile)
    k = pipe.num_classes
    if args.labels is not None:
        try:
            values = [int(s) for s in args.labels.split(",")]
        except ValueError:
            raise UserError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
        out_of_range = [v for v in values if not 0 <= v < k]  # before a tensor, which cannot hold every Python int
        if out_of_range:
            raise UserError(f"label {out_of_range[0]} is out of range: classes are 0..{k - 1}")
        labels = torch.tensor(values)
    elif args.n is not None:
        labels = pipe.cycled_labels(args.n)
    else:
        per_class = 10 if args.per_class is None else args.per_class
        check_image_count(k * per_class, pipe.config, f"--per-class {per_class:,} ({k * per_class:,} images) and their labels")
        labels = torch.arange(k).repeat_interleave(per_class)
    labels = pipe.validate_labels(labels)
    out = args.out.with_suffix("") if args.out.suffix.lower() in (".png", ".npz", ".gif") else args.out
    _refuse_a_file_of_a_run(out.with_name(out.name + ".png"), "--out")
    ensure_writable_dir(out.parent)
    for suffix in (".png", ".npz") + (() if args.no_gif else (".gif",)):  # all or none of them: fail before sampling
        if out.with_name(out.name + suffix).is_dir():
            raise UserError(f"{out.with_name(out.name + suffix)} is a directory; choose another --out")
    trajectory: list | None = None if args.no_gif else []
    images = pipe(labels, sampler=args.sampler, steps=args.steps, guidance=args.guidance, guidance_interval=interval, seed=args.seed,
                  batch_size=args.batch_size, trajectory=trajectory, progress=True)  # fmt: skip

    def write(staging: Path) -> None:
        pipe.save_grid(images, labels, staging / f"{out.name}.png")
        save_npz(images, labels, staging / f"{out.name}.npz")
        if trajectory:
            save_gif(trajectory, labels, pipe.class_names, staging / f"{out.name}.gif")

    # One set: an interrupted write keeps the old files, and no gif of an earlier call is left beside new images.
    written = replace_set(out.parent, [out.name + suffix for suffix in (".png", ".npz", ".gif")], write)
    print("\n".join(str(p) for p in written))


def cmd_eval(args) -> None:
    from .compare.budget import parse_guidances
    from .diffusion import check_sampler
    from .evaluate import GUIDANCE_NAME, GUIDANCE_RULE, QualityMeter, dumps, format_guidance_table, format_report
    from .evaluate import check_floor_count, load_npz, pick_guidance, report, write_guidance
    from .io import ensure_writable_file

    guidances = None if args.guidance is None else parse_guidances(args.guidance, "--guidance")
    if args.plot is not None:
        from .compare.report import check_plot_path

        _refuse_a_file_of_a_run(args.plot, "--plot")
        check_plot_path(args.plot)
    if args.source.is_dir():
        from .sample import Pipeline

        args.n, args.seed = args.n or 5000, args.seed or 0
        pipe = Pipeline.from_pretrained(args.source, use_ema=not args.no_ema, device=args.device)
        if guidances is not None and len(guidances) > 1:
            ensure_writable_file(args.source / GUIDANCE_NAME)  # for the pick: fail before sampling, not after
        guidances = guidances or [pipe.guidance]
        dataset = pipe.config.train.dataset
        if args.dataset is not None and args.dataset != dataset:  # scored against another dataset's features, silently
            raise UserError(f"--dataset {args.dataset}: {args.source} was trained on {dataset}, and is scored against it; drop --dataset")
        labels = pipe.cycled_labels(args.n)
        sampler = check_sampler(pipe.diffusion, args.sampler)
        steps = args.steps or pipe.diffusion.default_steps(sampler)

        def draw(g):
            return pipe(labels, sampler=sampler, steps=steps, guidance=g, seed=args.seed, progress=True)

    elif args.source.is_file():
        if args.source.suffix.lower() != ".npz":  # e.g. a checkpoint: the flags' complaints below would mislead
            raise UserError(f"{args.source} is not an .npz of images; give a run or export directory, or the .npz that simple-dit sample writes")
        if (guidances is not None and len(guidances) > 1) or args.plot is not None:
            raise UserError(f"{'--plot' if args.plot is not None else 'a --guidance list'} needs a run directory to sample from, not an .npz")
        drawing = [flag for flag, given in (("--sampler", args.sampler is not None), ("--steps", args.steps is not None),
                                            ("--guidance", guidances is not None), ("--n", args.n is not None),
                                            ("--seed", args.seed is not None), ("--no-ema", args.no_ema),
                                            ("--device", args.device is not None)) if given]  # fmt: skip
        if drawing:
            raise UserError(f"{drawing[0]} says how to draw samples from a run; an .npz holds its images already")
        images, labels = load_npz(args.source)
        dataset = args.dataset or "mnist"

        def draw(g):
            return images

    else:
        raise UserError(f"{args.source} is neither a run directory nor an .npz file")
    n = args.n if args.source.is_dir() else images.shape[0]
    check_floor_count(n, dataset, f"--n {n:,} is" if args.source.is_dir() else f"{args.source} holds {n:,} images,")
    meter = QualityMeter(dataset, args.data_dir)
    rows, scored, floor = [], [], None
    for g in guidances or [None]:
        if guidances and len(guidances) > 1:
            print(f"guidance {g:g}", file=sys.stderr, flush=True)
        images = draw(g)
        floor = floor or meter.floor(images.shape[0], bootstrap=args.bootstrap)
        scored.append(meter.score(images, labels, bootstrap=args.bootstrap))
        rows.append(({} if g is None else {"guidance": g}) | {k: v for k, v in dataclasses.asdict(scored[-1]).items() if v is not None})
    picked = pick_guidance(rows) if len(rows) > 1 else rows[0]
    # The picked scale's scores under the keys a single evaluation has always had.
    result = ({"guidance": picked["guidance"]} if "guidance" in picked else {}) | report(scored[rows.index(picked)], floor) | {"dataset": dataset}
    floor_row = {k: v for k, v in dataclasses.asdict(floor).items() if v is not None}
    if len(rows) > 1:
        result |= {"guidance_rule": GUIDANCE_RULE, "guidances": rows}
        print(f"n = {result['n']}")
        print(format_guidance_table(rows, floor_row, picked["guidance"]))
        write_guidance(args.source, rows, n=args.n, sampler=sampler, steps=steps, seed=args.seed, ema=not args.no_ema, step=pipe.step)
        print(f"recorded guidance {picked['guidance']:g} in {args.source / 'guidance.json'}")
    else:
        print(format_report(result))
    if args.plot is not None:
        from .compare.report import write_frontier_figure

        write_frontier_figure([(args.source.name, rows, picked.get("guidance"))], floor_row, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        print(dumps(result))


def cmd_export(args) -> None:
    from .export import export, push_to_hub, require_hub

    if args.push_to_hub is not None:  # before anything is written
        if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", args.push_to_hub) or len(args.push_to_hub) > 96:
            raise UserError(f"--push-to-hub takes a Hugging Face repository id, NAME or OWNER/NAME, got {args.push_to_hub!r}")
        require_hub()
    path = export(args.run_dir, args.out, dtype=args.dtype)
    print(f"exported: {path}")
    if args.push_to_hub is not None:
        print(f"uploaded: {push_to_hub(args.out, args.push_to_hub)}")


def cmd_bench(args) -> None:
    import json

    from .bench import run_bench

    result = run_bench(args.preset, batch_size=args.batch_size, what=args.what, reference=args.reference,
                       precision=args.precision, device=args.device, repeats=args.repeats, compile=args.compile,
                       together=args.runs_together)  # fmt: skip
    for key, value in result.items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")  # dit-tiny's GFLOPs are 0.001
    print(json.dumps(result))


def cmd_compare(args) -> None:
    from .compare import compare, effect_lines, fmt_stat, rewrite_report, verdict_lines

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # its processes would each run the whole comparison
        raise UserError("compare runs in one process; start it without torchrun (train is the command torchrun runs)")

    if args.report_only:
        # Every setting comes from the comparison itself; one given here would be ignored, so refuse it.
        defaults = vars(build_parser().parse_args(["compare", "--report-only", "--out", str(args.out)]))
        given = [k for k, v in vars(args).items() if k not in ("out", "data_dir", "device") and v != defaults.get(k)]
        if given:
            raise UserError(f"--report-only reports {args.out} under its own settings (its compare.json); drop --{given[0].replace('_', '-')}")
        results = rewrite_report(args.out, data_dir=args.data_dir, device=args.device)
    else:
        if args.presets is None or args.budget is None:
            raise UserError("compare needs --presets and --budget (or --report-only, to rewrite an existing comparison's report)")
        if args.seeds is not None and args.seed is not None:
            raise UserError("give --seeds or --seed, not both")
        results = compare(
            args.presets, args.budget, args.out, lrs=args.lrs, eval_every_frac=args.eval_every_frac, eval_n=args.eval_n,
            steps=args.steps, sampler=args.sampler, guidances=args.guidances, dataset=args.dataset, data_dir=args.data_dir,
            seeds=args.seeds if args.seeds is not None else (args.seed or 0), objectives=args.objective, device=args.device,
            precision=args.precision, wandb=args.wandb, compile=args.compile, final_n=args.final_n, together=args.runs_together,
        )  # fmt: skip
    for e in results["presets"]:
        st = e["best_stats"]
        lr, g = (f"{e[k]:g}" if e[k] is not None else "–" for k in ("best_lr", "best_guidance"))
        print(f"{e['label']}: best lr {lr}, guidance {g}, FID {fmt_stat(st['fid'], '.2f')}, label accuracy {fmt_stat(st['label_accuracy'])}")
    for line in verdict_lines(results):
        print(line)
    for line in effect_lines(results):
        print(line)
    for line in verdict_lines(results, confirmed=True) + effect_lines(results, confirmed=True):
        print(f"confirmed on {results['settings']['final_n']:,} fresh samples: {line}")
    print(f"report: {args.out / 'report.html'}")


def cmd_serve(args) -> None:
    from .serve import serve

    serve(args.run_dir, host=args.host, port=args.port, device=args.device)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}; nothing it wrote is left half-written")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error or --help: an exit status, so main(argv) returns in-process callers one too
        return e.code
    keep_freed_memory()
    # SIGTERM as an exception, as Ctrl-C is: unfinished writes remove their temporaries and locks
    # are released (the training loop takes the signal over, to checkpoint first).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main_thread else None
    try:
        return _run(parser, args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def end_if_distributed(status: int) -> None:
    """Under torchrun, where train joined the process group: the process ended here with
    ``status``. DistributedDataParallel keeps the group's gloo threads alive past
    destroy_process_group (torch 2.13), and now and then they abort the interpreter's exit
    ("terminate called without an active exception", SIGABRT) after every file was written and
    closed: a finished run was reported failed. Nothing is left for the interpreter's teardown to
    do by then. A group that a stop or an error left is not destroyed here: under NCCL that can
    wait on processes that are gone. Called by the program's entry points, never by ``main``,
    which in-process callers call."""
    trained = sys.modules.get(f"{__package__}.train")  # a command that never imported it made no group
    if trained is None or not trained.made_a_process_group():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "compare": cmd_compare, "export": cmd_export,
            "serve": cmd_serve, "bench": cmd_bench}


def _speaks() -> bool:
    """Whether this process says why it stopped: under torchrun, rank 0 alone (every process
    checks the same input and stops at the same step, and would say the same line)."""
    return os.environ.get("RANK", "0") == "0"


def _run(parser: argparse.ArgumentParser, args) -> int:
    """The command ``args`` names; its exit status, with one line on stderr for what is not a bug."""
    try:
        if args.list_presets:
            if args.command is not None:
                raise UserError(f"--list-presets lists the presets and runs nothing; give it alone, without {args.command}")
            print(list_presets())
        elif args.command in COMMANDS:
            COMMANDS[args.command](args)
        else:
            parser.print_help()
            return 2
    except UserError as e:
        if _speaks():
            print(f"simple-dit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a size limit, a vanished directory: one line, not a traceback
        print(f"simple-dit: error: {os.fsdecode(e.filename) + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2 if e.errno == errno.ENAMETOOLONG else 1  # a name too long is bad input, like any other
    except Interrupted as e:
        if _speaks():
            print(f"simple-dit: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("simple-dit: interrupted; nothing it wrote is left half-written", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        # PyTorch's CPU allocator raises a RuntimeError, CUDA's an OutOfMemoryError (a RuntimeError
        # too); every other error is a bug and keeps its traceback.
        if not (isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e)):
            raise
        print("simple-dit: error: out of memory; ask for less at a time (--batch-size, --n, --bootstrap)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    status = main()
    end_if_distributed(status)
    sys.exit(status)
