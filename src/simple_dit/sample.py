"""Sampling: the ``Pipeline`` object and the files it writes (grid PNG, ADM-style NPZ, GIF).

    pipe = Pipeline.from_pretrained("runs/mini")
    images = pipe(labels=[3, 3, 7], steps=50, guidance=3.0, seed=0)   # uint8 (N, C, H, W)
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import weights_mismatch
from .config import RunConfig
from .data import DATASETS, to_uint8
from .diffusion import DEFAULT_GUIDANCE, check_guidance, check_sampler, make_process
from .errors import UserError
from .io import atomic_write
from .models import build_model
from .runtime import all_finite, autocast, check_fits_in_memory, check_positive_int, check_seed, parse_device, resolve_precision

GIF_FRAMES = 40
GIF_MAX_IMAGES = 100
MAX_SANE_GUIDANCE = 100.0  # far past any useful scale (the web page allows 20); where sampling overflows, a likelier cause than the weights


def image_generators(seed: int, first: int, count: int) -> list[torch.Generator]:
    """The generators of images ``first`` .. ``first + count - 1`` of a request: image i's seeded
    with start + i, where ``start`` is a hash of the request's seed. On the CPU, so that a seed
    draws the same noise on every device. PyTorch's CPU generator keeps only 32 bits of a seed, so
    seed * 2**32 + i would give every request the same noise, and seed + i seed 1's first image
    seed 0's second one's."""
    start = int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")
    return [torch.Generator().manual_seed((start + i) % 2**32) for i in range(first, first + count)]


def _check_model_matches(model_config, model: torch.nn.Module) -> None:
    """``model`` is the network ``model_config`` describes (its class, and every weight's shape)."""
    with torch.device("meta"):  # the shapes without the memory
        expected = build_model(model_config)
    given = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not isinstance(given, type(expected)):
        differs = f"a {type(given).__name__} for a {type(expected).__name__}"
    else:
        # Buffers too: the DiT's positions are not saved with its weights, but fix its image size.
        shapes = {name: tuple(t.shape) for name, t in [*given.named_parameters(), *given.named_buffers()]}
        wanted = {name: tuple(t.shape) for name, t in [*expected.named_parameters(), *expected.named_buffers()]}
        first = next((name for name in wanted if shapes.get(name) != wanted[name]), None) or next((n for n in shapes if n not in wanted), None)
        differs = first and f"{first} is {shapes.get(first, 'missing')}, the config's {wanted.get(first, 'absent')}"
    if differs:
        raise UserError(f"the model is not the network config.model describes ({differs}); build it with simple_dit.models.build_model(config.model)")


def sampling_network(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A copy of ``model`` as a sampler runs it at ``precision`` (under ``autocast``): in bf16 with
    bf16 weights. Autocast over fp32 weights would cast every weight on every call and hand the
    tokens from block to block in fp32; a 2-core Zen 5 EPYC evaluates dit-mini, dit-seed and
    unet-seed 1.07-1.17x faster this way (BENCHMARKS.md). ``simple-dit bench`` times this network too."""
    return copy.deepcopy(model).to(torch.bfloat16 if precision == "bf16" else None)  # .to(None) keeps the dtype


def check_image_count(n: int, config: RunConfig, what: str | None = None) -> int:
    """``n`` where this machine can hold n images of ``config``'s model with their labels (uint8
    pixels, int64 labels), else a UserError saying so of ``what`` (default: the n images)."""
    n = check_positive_int(n, "the number of images")
    image_bytes = 8 + config.model.in_channels * config.model.input_size**2
    check_fits_in_memory(n * image_bytes, what or f"{n:,} images and their labels")
    return n


class Pipeline:
    def __init__(
        self,
        config: RunConfig,
        model: torch.nn.Module,
        *,
        device: torch.device | str | None = None,
        precision: str = "auto",
        class_names: Sequence[str] | None = None,
        guidance: float = DEFAULT_GUIDANCE,
        compile: bool = False,
    ):
        if not isinstance(config, RunConfig) or not isinstance(model, torch.nn.Module):
            raise UserError(f"a Pipeline takes a RunConfig and a torch module, got {type(config).__name__} and {type(model).__name__}")
        _check_model_matches(config.model, model)
        if not isinstance(compile, bool):  # "no" would be true
            raise UserError(f"compile must be True or False, got {compile!r}")
        self.config = copy.deepcopy(config)  # the network's: a caller's later edit must not describe another one
        self.compile = compile  # torch.compile the sampling network (CUDA graphs on a GPU)
        self._compiled = None  # (its weights, the compiled network), made on the first call
        self._guidance = check_guidance(guidance)  # the default of __call__: a run's guidance.json, else DEFAULT_GUIDANCE
        self.step: int | None = None  # the training step of the weights, where from_pretrained knows it
        self._guidance_error: UserError | None = None  # a damaged guidance.json, said when the default is needed
        self._guidance_note: str | None = None  # an outdated one, said when the default is first used
        self.device = parse_device(device)
        self.precision = resolve_precision(precision, self.device)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise UserError("the model's weights are on the meta device (shapes without values): load weights into it first")
        kinds = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if kinds - {torch.float32}:  # bf16 sampling is autocast over fp32 weights (precision="bf16")
            raise UserError(f"a Pipeline samples from fp32 weights (bf16 by autocast, precision='bf16'); the model's are {sorted(map(str, kinds))}: pass model.float()")
        self.num_classes = config.model.num_classes
        dataset = DATASETS.get(config.train.dataset) if isinstance(config.train.dataset, str) else None
        if isinstance(class_names, str) or not (class_names is None or isinstance(class_names, Iterable)):  # a str: one name per letter
            raise UserError(f"class_names is a sequence of names, one per class, not {class_names!r}")
        self.class_names = tuple(class_names if class_names is not None else dataset.class_names if dataset else map(str, range(self.num_classes)))
        if not all(isinstance(name, str) for name in self.class_names):
            raise UserError(f"class_names must be strings, got {list(self.class_names)[:3]!r}...")
        if len(self.class_names) != self.num_classes:
            raise UserError(f"class_names must name the model's {self.num_classes} classes, got {len(self.class_names)} names")
        # Last: a refused Pipeline leaves the caller's model where and as it was (in training mode, on its device).
        self.model = model.to(self.device).eval()
        self.diffusion = make_process(config.diffusion)

    @classmethod
    def from_pretrained(
        cls, run_dir: str | Path | None = None, *, use_ema: bool = True, device=None, precision: str = "auto", compile: bool = False
    ) -> "Pipeline":
        """A run directory (its checkpoint), a directory written by ``simple-dit export``, or, with
        no argument or the name "default", the dit-mini shipped in the package."""
        from .export import load_pretrained

        if not isinstance(use_ema, bool):
            raise UserError(f"use_ema must be True or False, got {use_ema!r}")
        config, weights, directory, step = load_pretrained(run_dir, use_ema=use_ema)
        model = build_model(config.model)
        problem = weights_mismatch(model, weights)
        if problem:
            raise UserError(f"the weights in {run_dir or 'the default model'} do not match their config: {problem}")
        model.load_state_dict(weights)
        if not all_finite(weights.values()):
            raise UserError(f"the weights in {run_dir or 'the default model'} are not all finite: the file is damaged (or from a diverged run); restore it or train again")
        from .evaluate import read_guidance

        picked, error = None, None
        try:
            picked = None if directory is None else read_guidance(directory)  # by `simple-dit eval --guidance LIST` or compare
        except UserError as e:  # an explicit guidance, or the eval that rewrites the file, does not need it
            error = e
        pipe = cls(config, model, device=device, precision=precision, guidance=DEFAULT_GUIDANCE if picked is None else picked[0],
                   compile=compile)  # fmt: skip
        pipe._guidance_error, pipe.step = error, step
        if picked is not None and None not in (picked[1], step) and picked[1] != step:
            # Still the default (a scale picked some steps earlier is a better guess than none), but said when used.
            pipe._guidance_note = (f"simple-dit: the guidance in {directory / 'guidance.json'} ({picked[0]:g}) was picked for the weights "
                                   f"of step {picked[1]}, these are step {step}'s; rerun simple-dit eval with a --guidance list to pick again")  # fmt: skip
        return pipe

    @property
    def guidance(self) -> float:
        """The guidance scale a call uses by default."""
        if self._guidance_error is not None:
            raise self._guidance_error
        if self._guidance_note is not None:
            print(self._guidance_note, file=sys.stderr, flush=True)
            self._guidance_note = None  # once
        return self._guidance

    def cycled_labels(self, n: int) -> torch.Tensor:
        """0, 1, ..., K-1, 0, 1, ... for n images: every class equally often (within one)."""
        return torch.arange(check_image_count(n, self.config)) % self.num_classes

    def validate_labels(self, labels) -> torch.Tensor:
        """``labels`` as a 1-D long tensor on the CPU; anything but class indices is a UserError."""
        if isinstance(labels, (list, tuple)) and any(isinstance(v, bool) for v in labels):  # [3, True] would sample class 1
            raise UserError(f"labels must be class indices, not True or False: {list(labels)[:8]!r}")
        try:
            labels = torch.as_tensor(labels, device="cpu")
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise UserError(f"labels must be class indices (a list, array or tensor of integers): {str(e).splitlines()[0]}") from None
        if labels.numel() == 0:
            raise UserError("no labels to sample")
        if labels.ndim > 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise UserError(f"labels must be a 1-D sequence of integer class indices, got {labels.dtype} of shape {tuple(labels.shape)}")
        if labels.dtype in (torch.uint32, torch.uint64):  # .long() would wrap the largest into negatives
            too_large = labels.double() >= self.num_classes
            if bool(too_large.any()):
                raise UserError(f"label {labels[too_large][0].item()} is out of range: classes are 0..{self.num_classes - 1}")
        labels = labels.long().flatten()
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise UserError(f"label {int(bad[0])} is out of range: classes are 0..{self.num_classes - 1}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        labels,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        seed: int = 0,
        batch_size: int = 250,
        trajectory: list | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """uint8 images (N, C, H, W) for ``labels``, drawn ``batch_size`` at a time.

        The same arguments and seed give the same images, and an image does not depend on
        ``batch_size`` (each image draws its noise from its own generator). Guidance applies where
        the path's time (0 = data, 1 = noise) lies in ``guidance_interval`` [lo, hi]; default: the
        objective's. If ``trajectory`` is a list, it receives uint8 frames of the first batch's
        denoising (at most GIF_FRAMES of them).
        """
        labels = self.validate_labels(labels)
        check_image_count(len(labels), self.config)
        if trajectory is not None and not isinstance(trajectory, list):
            raise UserError(f"trajectory must be a list (it receives the frames) or None, got {type(trajectory).__name__}")
        guidance = self.guidance if guidance is None else check_guidance(guidance)
        seed = check_seed(seed, "seed")
        c, s = self.model.in_channels, self.config.model.input_size
        sampler = check_sampler(self.diffusion, sampler)
        n_steps = self.diffusion.default_steps(sampler) if steps is None else check_positive_int(steps, "steps")
        self.diffusion.check_steps(n_steps)  # more steps than the process has: refused before the progress bar is drawn
        if not isinstance(progress, bool):  # "no" is truthy
            raise UserError(f"progress must be True or False, got {progress!r}")
        batch_size = check_positive_int(batch_size, "batch_size")  # a Python int: split() takes no NumPy one
        record_every = max(1, n_steps // GIF_FRAMES)
        from tqdm import tqdm

        batches = labels.split(batch_size)
        model = self._sampling_model()

        def check_finite(x: torch.Tensor) -> None:
            if not bool(torch.isfinite(x).all()):
                raise UserError(f"sampling produced non-finite values (NaN or inf): the weights are damaged or diverged"
                                f"{f', or guidance {guidance:g} is too large' if guidance > MAX_SANE_GUIDANCE else ''}")  # fmt: skip

        out = []
        with tqdm(total=len(batches) * n_steps, unit="step", desc="sampling", disable=not progress, dynamic_ncols=True) as bar:
            for b, batch_labels in enumerate(batches):

                def on_step(i: int, x: torch.Tensor) -> None:
                    bar.update(1)
                    if b == 0 and i == 0:
                        check_finite(x)  # a guidance far too large shows at once, not after every batch (one host sync)
                    if trajectory is not None and b == 0 and ((i + 1) % record_every == 0 or i + 1 == n_steps):
                        trajectory.append(to_uint8(x[:GIF_MAX_IMAGES]).cpu())

                with autocast(self.device, self.precision):
                    x = self.diffusion.sample(
                        model, batch_labels.to(self.device), sampler=sampler, steps=n_steps, guidance=guidance,
                        guidance_interval=guidance_interval, null_class=self.num_classes,
                        generator=image_generators(seed, b * batch_size, len(batch_labels)),
                        image_shape=(c, s, s), on_step=on_step,
                    )  # fmt: skip
                check_finite(x)
                out.append(to_uint8(x).cpu())
        return torch.cat(out)

    def _sampling_model(self) -> torch.nn.Module:
        """The network as the sampler runs it (``sampling_network``). Copied per call because the
        pipeline may hold weights that are still changing (the EMA during training). Compiled, one
        copy for the pipeline's life whose weights are refreshed in place on each call, so that its
        compiled graphs stay valid."""
        if not self.compile:
            return sampling_network(self.model, self.precision)
        if self._compiled is None:
            from .runtime import compile_model

            network = sampling_network(self.model, self.precision)
            compiled = compile_model(network, self.device)

            def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                # A CUDA graph's output is overwritten by its next replay, and the multistep
                # samplers keep earlier outputs (Heun's first slope, DPM-Solver++'s last x0).
                return compiled(x, t, y).clone()

            self._compiled = (network, run)
        network, run = self._compiled
        with torch.no_grad():
            for mine, current in zip(network.state_dict().values(), self.model.state_dict().values()):
                mine.copy_(current)
        return run

    # ---- files ---------------------------------------------------------------------------------

    def grid(self, images: torch.Tensor, labels, max_per_row: int = 16):
        labels = self.validate_labels(labels)
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)):
            raise UserError(f"a grid takes uint8 images (N, C, H, W) and one label per image, got {getattr(images, 'dtype', type(images))} "
                            f"{tuple(getattr(images, 'shape', ()))} and {len(labels)} labels")  # fmt: skip
        if images.shape[1] not in (1, 3) or images.is_meta or 0 in images.shape[2:]:
            raise UserError(f"a grid takes grey (1 channel) or RGB (3 channel) images with values, got {images.shape[1]} channels of "
                            f"{images.shape[2]} x {images.shape[3]} on {images.device}")  # fmt: skip
        return labelled_grid(images.cpu(), labels, self.class_names, check_positive_int(max_per_row, "max_per_row"))

    def save_grid(self, images: torch.Tensor, labels, path: str | Path) -> Path:
        if not isinstance(path, (str, os.PathLike)) or Path(path).suffix.lower() != ".png":
            raise UserError(f"a grid is saved as a PNG file: give a path ending in .png, got {path!r}")
        return save_png(self.grid(images, labels), path)


def labelled_grid(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], max_per_row: int = 16, scale: int = 2):
    """A PIL image with one row per class present, its name on the left."""
    from PIL import Image, ImageDraw

    n, c, h, w = images.shape
    classes = sorted(set(labels.tolist()))
    per_row = min(max_per_row, max(int((labels == k).sum()) for k in classes))
    margin, pad = 12 * scale + max(len(class_names[k]) for k in classes) * 6 * scale, 2
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("L" if c == 1 else "RGB", (margin + per_row * cell_w, len(classes) * cell_h), 0)
    draw = ImageDraw.Draw(canvas)
    for row, k in enumerate(classes):
        members = images[labels == k][:per_row]
        draw.text((4, row * cell_h + cell_h // 2 - 6), class_names[k], fill=255 if c == 1 else (255, 255, 255))
        for col, img in enumerate(members):
            arr = img.permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr[..., 0] if c == 1 else arr).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (margin + col * cell_w, row * cell_h))
    return canvas


def save_png(image, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def save_npz(images: torch.Tensor, labels: torch.Tensor, path: str | Path) -> Path:
    """ADM/DiT evaluation convention: ``arr_0`` uint8 (N, H, W, C) and ``labels`` int64."""
    path = Path(path)
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr, labels=labels.numpy().astype(np.int64))

    atomic_write(path, write)
    return path


def save_gif(frames: list[torch.Tensor], labels: torch.Tensor, class_names: Sequence[str], path: str | Path) -> Path:
    """Animate the denoising trajectory as a sequence of labelled grids; the last frame lingers."""
    path = Path(path)
    labels = labels[: frames[0].shape[0]]
    grids = [labelled_grid(f, labels, class_names) for f in frames]
    durations = [80] * (len(grids) - 1) + [1500]
    atomic_write(
        path, lambda tmp: grids[0].save(tmp, format="GIF", save_all=True, append_images=grids[1:], duration=durations, loop=0)
    )
    return path
