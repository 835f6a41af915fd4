"""Training: one loop, top to bottom.

    simple-dit train --preset dit-mini --out runs/mini --minutes 10

The run directory holds config.json, checkpoint.safetensors (weights, EMA, optimiser, RNG),
metrics.jsonl, TensorBoard events under tb/, and sample grids under samples/.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (
    CHECKPOINT_NAME, CONFIG_NAME, FINAL_GRID_NAME, check_not_inside_a_run, load_training_state, read_config_json, save_checkpoint,
)  # fmt: skip
from .config import RunConfig, validate_config
from .data import load_dataset
from .diffusion import DEFAULT_GUIDANCE, make_process
from .errors import Interrupted, TrainingDiverged, UserError
from .io import LOCK_NAME, DirectoryLock, StopSignals, atomic_copy, ensure_writable_dir, is_temporary, read_jsonl, write_json
from .logger import METRICS_NAME, WANDB_RUN_NAME, RunLogger, WandbOptions, is_eval_record, truncate_metrics
from .models import build_model
from .runtime import (
    MAX_COUNT, all_finite, autocast, compile_model, cudagraph_skips, deterministic_compiled_kernels, has_fused_adamw, parse_device, resolve_precision, rng_state, set_rng_state, synchronize,
    total_norm, warn_cudagraphs_skipped,
)  # fmt: skip


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # optimiser steps only: grids, evaluations and checkpoints are not counted
    # The logging window open at the checkpoint (_Window.saved): a run resumed from it logs the
    # records of a run that never stopped, not a window cut in two.
    open_window: dict = field(default_factory=dict)
    # Whether the last stretch of training ran the compiled step (--compile, and the compiler did
    # not fail): under a time budget it decides how many images a run sees.
    compiled: bool = False


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay that warms up: the average covers about the last step/10 steps early on, so a
    short run's EMA follows the model instead of staying stuck near its random initialisation."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch, a pure function of (seed, epoch) so a resumed run replays it."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class EpochOrder:
    """The examples each step trains on: whole batches of each epoch's permutation, in order (the
    last partial batch of an epoch is left out)."""

    def __init__(self, num_examples: int, seed: int, batch_size: int, device: torch.device):
        self.num_examples, self.seed, self.batch_size, self.device = num_examples, seed, batch_size, device
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int, start: int = 0, size: int | None = None) -> torch.Tensor:
        """Positions ``start`` to ``start + size`` (default: the whole batch) of step ``step``'s batch."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.num_examples, self.seed, epoch).to(self.device)
        first = offset * self.batch_size + start
        return self._perm[first : first + (self.batch_size if size is None else size)]


def planned_steps(tc, num_examples: int) -> int:
    """The step at which training stops: ``max_steps``, else the steps of ``epochs`` (0 for a
    time budget alone)."""
    if tc.max_steps or tc.minutes:
        return tc.max_steps
    steps = tc.epochs * (num_examples // tc.batch_size)
    if steps > MAX_COUNT:
        raise UserError(f"--epochs {tc.epochs:g} is {steps:,.0f} steps at batch {tc.batch_size}, more than a run can take ({MAX_COUNT:,})")
    return math.ceil(steps)


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


def make_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel does the whole update in one pass over the parameters (BENCHMARKS.md).
    tc = config.train
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=has_fused_adamw(device))


def train_step(model, diffusion, optimizer, x0: torch.Tensor, y: torch.Tensor, *, precision: str, grad_clip: float = 0.0):
    """One optimiser step on one batch; training and every benchmark time this same function
    (``make_step`` may replay all of it but the optimiser's step as one CUDA graph).

    Returns the loss and the gradient norm as device tensors, so that the caller decides when to
    pay for a host sync.
    """
    with autocast(x0.device, precision):
        loss = diffusion.training_loss(model, x0, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), clip_and_step(optimizer, grad_clip)


def clip_gradients(params: list[torch.nn.Parameter], grad_clip: float) -> torch.Tensor:
    """Clip the gradients of ``params`` (``grad_clip`` > 0); returns their norm before clipping
    as a device tensor, still measured without clipping: a non-finite norm is how divergence
    shows first."""
    params = [p for p in params if p.grad is not None]
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip).detach()
    return total_norm([p.grad for p in params]).detach()


def clip_and_step(optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Clip the gradients (``grad_clip`` > 0), take the optimiser step; returns the gradient norm
    (before clipping) as a device tensor."""
    grad_norm = clip_gradients([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()
    return grad_norm


class CapturedStep:
    """``train_step`` with its forward and backward passes and its gradient clipping recorded once
    as a CUDA graph and replayed on every step: a small model's step is bound by launching several
    hundred kernels one at a time from Python (issue 8), a replay is one launch. Each call copies
    its batch into the graph's own input tensors. The optimiser steps outside the graph, eagerly:
    its learning rate changes during warm-up, and a captured AdamW would need it as a tensor in the
    param groups that checkpoints store as numbers.

    The graph draws its noise, timesteps and dropped labels from the default CUDA generator at the
    offsets the uncaptured step would use, and the capture leaves the generators, the weights and
    the BatchNorm statistics as it found them: a captured run trains the steps an uncaptured one
    trains, and a checkpoint resumes exactly.
    """

    def __init__(self, model, forward_model, diffusion, optimizer, x0: torch.Tensor, y: torch.Tensor, *, precision: str, grad_clip: float):
        device = x0.device
        self.optimizer = optimizer
        self.x0, self.y = x0.clone(), y.clone()
        params = [p for p in model.parameters() if p.requires_grad]

        def forward_backward():
            with autocast(device, precision):
                loss = diffusion.training_loss(forward_model, self.x0, self.y)
            loss.backward()
            return loss.detach(), clip_gradients(params, grad_clip)

        # Warm-up and capture on one side stream: the libraries' lazy set-up (cuBLAS handles and
        # workspaces, per stream) must happen before the capture, on the stream it captures.
        previous, stream = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        stream.wait_stream(previous)
        with leaving_as_found([model], device):
            try:
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        forward_backward()
                        for p in params:
                            p.grad = None  # the graph's backward allocates the gradients it writes each replay
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=stream):
                    self.loss, self.grad_norm = forward_backward()
            except BaseException:
                # A capture that fails inside leaves its stream current and the generator marked
                # as capturing, and every later random draw on the GPU would fail: the uncaptured
                # step that replaces this one draws its noise from it.
                torch.cuda.set_stream(previous)
                generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
                generator.graphsafe_set_state(generator.clone_state())
                for p in params:
                    p.grad = None  # the failed capture's gradients live in its memory pool, which is gone
                raise
            finally:
                previous.wait_stream(stream)

    def __call__(self, x0: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.x0.copy_(x0)
        self.y.copy_(y)
        self.graph.replay()
        self.optimizer.step()
        # Copies: the graph's own outputs are overwritten by the next replay.
        return self.loss.clone(), self.grad_norm.clone()


def make_step(model, forward_model, diffusion, optimizer, x0: torch.Tensor, y: torch.Tensor, *, precision: str, grad_clip: float,
              compile: bool = False, capture: bool = False):  # fmt: skip
    """The step a run takes, as ``step(x0, y) -> (loss, grad_norm)``, and the seconds that
    compiling and capturing it took (None where nothing was compiled or captured). ``compile``
    runs ``forward_model`` through torch.compile; ``capture`` (CUDA, one process) replays the step
    as a ``CapturedStep``. Where the compiler or the capture fails, one line on stderr says why and
    the step goes on without it (a compiled network then with inductor's own CUDA graphs). ``x0``
    and ``y`` are a batch of the run's shape; nothing is trained on them."""
    start = time.perf_counter()

    def compiled(cudagraphs: bool):
        """``forward_model`` compiled and warmed up, or None where the compiler fails."""
        network = compile_model(forward_model, x0.device, cudagraphs=cudagraphs)

        def loss() -> torch.Tensor:
            with autocast(x0.device, precision):
                return diffusion.training_loss(network, x0, y)

        return None if warm_up_compiled(loss, [model], x0.device) is None else network

    network = compiled(cudagraphs=not capture) if compile else None
    if capture:
        try:
            step = CapturedStep(model, forward_model if network is None else network, diffusion, optimizer, x0, y,
                                precision=precision, grad_clip=grad_clip)  # fmt: skip
            return step, time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - whatever the capture raises, the step still runs uncaptured
            print(f"simple-dit: CUDA graph capture failed ({_with_first_cause(e)}); training without it", file=sys.stderr, flush=True)
        if network is not None:  # then the network's own CUDA graphs, as --compile had before the capture
            network = compiled(cudagraphs=True)
    if network is not None:
        forward_model = network

    def step(x0: torch.Tensor, y: torch.Tensor):
        with deterministic_compiled_kernels(x0.device) if network is not None else contextlib.nullcontext():
            return train_step(forward_model, diffusion, optimizer, x0, y, precision=precision, grad_clip=grad_clip)

    return step, (None if network is None else time.perf_counter() - start)


def _with_first_cause(error: BaseException) -> str:
    """``Type: first line`` of ``error`` and of the error it was raised while handling, the first of
    its chain, where there is one: a capture that fails inside reports the failure of ending the
    capture, and the operation that broke it only as that error's context."""
    first, seen = error, {id(error)}
    # A context its raiser suppressed (``raise ... from None``) is not a cause.
    while (earlier := first.__cause__ or (None if first.__suppress_context__ else first.__context__)) is not None and id(earlier) not in seen:
        first = earlier
        seen.add(id(first))
    said = f"{type(error).__name__}: {_first_line(error)}"
    return said if first is error else f"{said}; first {type(first).__name__}: {_first_line(first)}"


def _first_line(error: Exception) -> str:
    """What an error says, in at most 200 characters of one line: a header such as
    "backend='inductor' raised:" says little without the line after it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:200]


def warm_up_compiled(loss: Callable[[], torch.Tensor], models: list[torch.nn.Module], device: torch.device) -> float | None:
    """Run the compiler on forward and backward passes of ``loss()``, whose every effect on
    ``models`` is undone (random generators, BatchNorm statistics, gradients); returns the
    seconds it took, or None where the compiler fails (one line on stderr says why, and the
    caller trains eager). The run's clock then counts training steps only, and the steps trained
    are those an eager run trains.
    """
    start, skips = time.perf_counter(), cudagraph_skips()
    parameters = [p for model in models for p in model.parameters()]
    with leaving_as_found(models, device), deterministic_compiled_kernels(device):
        try:
            # CUDA graph trees run a step eagerly, record the second and replay from the third.
            for _ in range(3 if device.type == "cuda" else 1):
                loss().sum().backward()
                for p in parameters:  # as train_step does: no gradient outlives its graph replay
                    p.grad = None
            synchronize(device)
        except Exception as e:  # noqa: BLE001 - whatever the compiler raises, eager still trains
            print(f"simple-dit: torch.compile failed ({type(e).__name__}: {_first_line(e)}); training eager", file=sys.stderr, flush=True)
            return None
        finally:
            for p in parameters:
                p.grad = None
    warn_cudagraphs_skipped(device, skips)
    return time.perf_counter() - start


@contextlib.contextmanager
def leaving_as_found(models: list[torch.nn.Module], device: torch.device):
    """Undo, on leaving, what the passes run inside did to the random generators and to the
    models' buffers (BatchNorm statistics): warm-up passes are not training steps."""
    rng = rng_state(device)
    buffers = [b.clone() for model in models for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip((b for model in models for b in model.buffers()), buffers):
                b.copy_(saved)
        set_rng_state(rng, device)


class _Window:
    """Sums over one logging window, kept on the device until the window is read."""

    def __init__(self):
        self.loss_sum = self.grad_norm_sum = 0.0
        self.steps, self.images, self.seconds, self.lr = 0, 0, 0.0, 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, images: int, lr: float) -> None:
        self.loss_sum += loss.float()
        self.grad_norm_sum += grad_norm.float()
        self.steps, self.images, self.lr = self.steps + 1, self.images + images, lr

    SCALARS = {k: f"train/{k}" for k in ("loss", "grad_norm", "lr", "images_per_s")}  # the TensorBoard names

    def saved(self) -> dict:
        """What a checkpoint keeps of the window ({} when it is empty); reads the sums (a host sync,
        as a checkpoint makes anyway). The fp32 sums are exact as Python floats, so a resumed
        window adds up to the same record."""
        if not self.steps:
            return {}
        return {"steps": self.steps, "images": self.images, "seconds": self.seconds, "lr": self.lr,
                "loss_sum": float(self.loss_sum), "grad_norm_sum": float(self.grad_norm_sum)}  # fmt: skip

    @classmethod
    def resumed(cls, saved: dict) -> "_Window":
        window = cls()
        if saved:
            window.steps, window.images, window.seconds, window.lr = saved["steps"], saved["images"], saved["seconds"], saved["lr"]
            window.loss_sum, window.grad_norm_sum = saved["loss_sum"], saved["grad_norm_sum"]
        return window

    def record(self, state: TrainState, num_examples: int) -> dict:
        """The window's metrics.jsonl record; reading the sums is the loop's only host sync."""
        return {
            "step": state.step, "epoch": state.images_seen / num_examples, "loss": float(self.loss_sum) / self.steps,
            "grad_norm": float(self.grad_norm_sum) / self.steps, "lr": self.lr,
            "images_per_s": self.images / max(self.seconds, 1e-9), "train_seconds": state.train_seconds,
        }  # fmt: skip

    def check_finite(self, state: TrainState, last_checkpoint: int | None, models: tuple[torch.nn.Module, ...] = ()) -> None:
        """Stop before anything is written from a diverged model (one host sync), and before a
        checkpoint of ``models`` whose weights or buffers are not finite: a BatchNorm's running
        variance can overflow while the loss and gradient norm stay finite (a UNet at lr 1000)."""
        if self.steps and not bool(torch.isfinite(torch.as_tensor(self.loss_sum + self.grad_norm_sum))):
            what = f"the loss or gradient norm became non-finite between steps {state.step - self.steps + 1} and {state.step}"
        elif not all_finite(t for model in models for t in model.state_dict().values()):
            what = f"the weights or BatchNorm statistics became non-finite by step {state.step}"
        else:
            return
        kept = "no checkpoint was written" if last_checkpoint is None else f"the checkpoint of step {last_checkpoint} is kept"
        raise TrainingDiverged(f"training diverged: {what}; {kept}; lower --lr or set --grad-clip")


def training_precision(precision: str, device: torch.device) -> str:
    """``precision`` resolved for ``device``; on a GPU, fp32 matmuls may use TF32 too."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return resolve_precision(precision, device)


def load_training_set(config: RunConfig, data_dir: str | None):
    """The training split of the config's dataset, checked against the model and the batch size."""
    tc = config.train
    dataset = load_dataset(tc.dataset, "train", data_dir)
    if dataset.num_classes != config.model.num_classes:
        raise UserError(f"{tc.dataset} has {dataset.num_classes} classes but the model expects {config.model.num_classes}")
    m = config.model
    if tuple(dataset.images.shape[1:]) != (m.in_channels, m.input_size, m.input_size):
        raise UserError(f"{tc.dataset} has images of shape {tuple(dataset.images.shape[1:])} but the model expects "
                        f"({m.in_channels}, {m.input_size}, {m.input_size})")  # fmt: skip
    if len(dataset) < tc.batch_size:
        raise UserError(f"--batch-size {tc.batch_size} is larger than the dataset ({len(dataset)} images)")
    return dataset


# What a resumed run must share with its checkpoint: what it trains, on what, and how. How long
# (epochs, max_steps, minutes) and how it is run and watched (precision, compile, logging) may change.
RESUME_FIXED = ("dataset", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "seed")


def check_resumable(config: RunConfig, out_dir: Path) -> None:
    """``config`` continues the run in ``out_dir`` (the CLI takes the saved recipe; the Python API
    is given one)."""
    from .checkpoint import load_config

    saved = load_config(out_dir)
    changed = [part for part in ("model", "diffusion") if getattr(saved, part) != getattr(config, part)]
    changed += [f"train.{name}" for name in RESUME_FIXED if getattr(saved.train, name) != getattr(config.train, name)]
    if changed:
        raise UserError(f"cannot resume {out_dir} with a different recipe ({', '.join(changed)}); resume with the saved one "
                        "(simple_dit.checkpoint.load_config) or train a new run")  # fmt: skip


def start_run(config: RunConfig, out_dir: Path, *, resume: bool, device: torch.device, stop_step: int = 0):
    """The run's model, EMA, optimiser and ``TrainState``: new ones from its seed, or its
    checkpoint's (which also restores the global RNG). A resumed run whose checkpoint is past
    ``stop_step`` (0: no step limit) is refused. Writes nothing: ``record_start`` does."""
    torch.manual_seed(config.train.seed)
    model = build_model(config.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, config, device)
    state = TrainState()
    if resume:
        state = TrainState(**load_training_state(out_dir, model, ema, optimizer))
        if stop_step and state.step > stop_step:
            raise UserError(f"{out_dir} is at step {state.step}, past the requested stop (step {stop_step}); "
                            "--resume with a later one continues it")  # fmt: skip
    return model, ema, optimizer, state


def record_start(config: RunConfig, out_dir: Path, state: TrainState) -> None:
    """Bring ``out_dir``'s records in line with a run (re)starting at ``state``: the records past
    its step (for a new run: of an attempt that never checkpointed) are about to be redone, as is
    the record of a logging window the run stopped in the middle of, and config.json is rewritten
    on resume too, which records a new stopping rule and repairs a damaged copy."""
    truncate_metrics(out_dir, state.step, partial_window=bool(state.open_window))
    (out_dir / METRICS_NAME).touch()  # a run has its record from the start, empty until the first log
    write_json(out_dir / CONFIG_NAME, config.to_dict())


def prepare_output_dir(out_dir: Path, resume: bool) -> DirectoryLock:
    """Check ``out_dir`` against ``resume`` and lock it for this process."""
    def check() -> None:
        for name, is_dir in ((CHECKPOINT_NAME, False), (CONFIG_NAME, False), (METRICS_NAME, False), (FINAL_GRID_NAME, False),
                             ("samples", True), ("tb", True)):  # fmt: skip
            if (out_dir / name).exists() and (out_dir / name).is_dir() != is_dir:
                raise UserError(f"{out_dir / name} is in the way: the run writes its {name} there as a "
                                f"{'directory' if is_dir else 'file'}; move it away")  # fmt: skip
        if resume and not (out_dir / CHECKPOINT_NAME).is_file():
            raise UserError(f"--resume: no checkpoint in {out_dir}")
        if not resume and (out_dir / CHECKPOINT_NAME).exists():
            raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        if not resume:
            _check_only_an_unfinished_attempt(out_dir)
            check_not_inside_a_run(out_dir)

    try:
        check()  # before the lock, so that a refused command leaves the directory untouched
    except UserError:
        DirectoryLock.check_free(out_dir)
        raise
    for directory in (out_dir, out_dir / "samples", out_dir / "tb"):  # a resumed run's, made by another user
        if directory == out_dir or directory.is_dir():
            ensure_writable_dir(directory)
    lock = DirectoryLock(out_dir)
    try:
        check()  # again under the lock: another process may have written a checkpoint meanwhile
    except UserError:
        lock.release()
        raise
    return lock


# What a run leaves before its first checkpoint; a new run may start over in a directory holding
# only these (a run killed early is started again, not resumed), and unfinished writes (io.is_temporary).
_UNFINISHED_ATTEMPT = {CONFIG_NAME, METRICS_NAME, "tb", "samples", LOCK_NAME, "wandb", WANDB_RUN_NAME}


def _check_only_an_unfinished_attempt(out_dir: Path) -> None:
    """Refuse to start a new run over anything else: a run whose checkpoint is gone (its records
    and grids), an export, or files that are not a run's."""
    if not out_dir.is_dir():
        return
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in _UNFINISHED_ATTEMPT and not is_temporary(p.name))
    config_is_a_runs = True
    if (out_dir / CONFIG_NAME).is_file():
        try:
            read_config_json(out_dir)
        except (ValueError, TypeError, KeyError, AttributeError, UserError):
            config_is_a_runs = False
    if others or not config_is_a_runs:
        what = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "") if others else f"a {CONFIG_NAME} that is not a run's"
        raise UserError(f"{out_dir} is not empty and holds no checkpoint to resume ({what}); choose another --out")


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        # NCCL for CUDA tensors, gloo for CPU ones: a CPU run on a GPU machine still needs gloo.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        global _made_a_group
        _made_a_group = True
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


_made_a_group = False  # by init_distributed (a group the caller made is the caller's to end)


def made_a_process_group() -> bool:
    """Whether this process joined torchrun's process group in ``init_distributed``."""
    return _made_a_group


def train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    data_dir: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    final_samples: bool = True,
    wandb: WandbOptions | str | None = None,
) -> Path:
    """Train ``config`` into ``out_dir`` and return the checkpoint path.

    Under torchrun each of the N processes takes 1/N of every batch (``batch_size`` is the global
    batch), so the data order and the meaning of a step do not depend on N: a checkpoint written
    with N processes resumes with M. Only rank 0 writes anything. ``final_samples=False`` skips
    the end-of-run grid (for callers that train in short segments and sample on their own).
    ``wandb`` (a W&B project name, or ``WandbOptions``) mirrors the logs and grids to Weights & Biases.
    Raises ``TrainingDiverged`` on a non-finite loss and ``Interrupted`` after SIGINT/SIGTERM,
    both with the last good checkpoint on disk.
    """
    from .sample import Pipeline, check_image_count, save_png

    validate_config(config)
    for name, value in (("resume", resume), ("progress", progress), ("final_samples", final_samples)):
        if not isinstance(value, bool):  # "no" is truthy: a run would be resumed that was not to be
            raise UserError(f"{name} must be True or False, got {value!r}")
    if wandb is not None and not isinstance(wandb, WandbOptions):
        wandb = WandbOptions(wandb)  # a project name, checked before anything is written
    out_dir, tc = Path(out_dir), config.train
    rank, world, local_rank = init_distributed()
    is_main = rank == 0
    device = parse_device(device)
    if world > 1 and device.type == "cuda":
        if device.index is not None and device.index != local_rank:  # all on one GPU: NCCL refuses it
            raise UserError(f"under torchrun each process trains on its own GPU, cuda:LOCAL_RANK; pass --device cuda, not {device}")
        device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"process {local_rank} of torchrun has no GPU {device.index}: this machine has {torch.cuda.device_count()}; "
                            "start at most that many processes per node, or train with --device cpu")  # fmt: skip
        torch.cuda.set_device(device)
    if tc.batch_size % world:
        raise UserError(f"--batch-size {tc.batch_size} is not divisible by the {world} processes")
    if tc.eval_every:  # refused now, not at the first evaluation
        check_image_count(tc.eval_n, config, f"--eval-n {tc.eval_n:,}: its images and labels")
    precision = training_precision(tc.precision, device)

    with contextlib.ExitStack() as cleanup:
        dataset = load_training_set(config, data_dir)  # a recipe that does not fit the data is refused before --out is touched
        max_steps = planned_steps(tc, len(dataset))
        recorded = False
        if is_main:
            fresh = not out_dir.exists()
            cleanup.callback(prepare_output_dir(out_dir, resume).release)

            def remove_if_refused(exc_type, *_) -> None:
                # A new run refused before its first record (e.g. W&B cannot start) leaves no directory behind.
                if fresh and exc_type is not None and not recorded:
                    shutil.rmtree(out_dir, ignore_errors=True)

            cleanup.push(remove_if_refused)
        if resume:
            check_resumable(config, out_dir)

        model, ema, optimizer, state = start_run(config, out_dir, resume=resume, device=device, stop_step=max_steps)
        # Grids and evaluations sample from the EMA weights; the pipeline holds them by reference.
        ema_pipe = Pipeline(config, ema, device=device, precision=precision, class_names=dataset.class_names)
        grid_labels = torch.arange(config.model.num_classes).repeat_interleave(8)

        def grid_path() -> Path:  # the periodic grid of the current step
            return out_dir / "samples" / f"step_{state.step:07d}.png"

        def draw_grid():
            """The current step's grid, saved to ``grid_path()``: (its path, the grid image)."""
            images = ema_pipe(labels=grid_labels, steps=25, guidance=DEFAULT_GUIDANCE, seed=0)
            grid = ema_pipe.grid(images, grid_labels)
            return save_png(grid, grid_path()), grid

        finished = resume and ((max_steps and state.step >= max_steps) or _time_is_up(tc.minutes, state.train_seconds, world, device))
        diffusion = make_process(config.diffusion).ready_for(device)
        forward_model = model
        if world > 1 and not finished:
            from torch.nn.parallel import DistributedDataParallel

            forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        def open_logger() -> RunLogger:
            logger = RunLogger(out_dir, enabled=is_main, config=config.to_dict(), wandb=wandb)
            cleanup.callback(logger.close)
            return logger

        if not finished:  # a finished run's records stay as they are, completed below only where a stop cut them short
            logger = open_logger()  # before the records are touched: a W&B run that cannot start leaves them as they were
            if is_main:
                record_start(config, out_dir, state)
                recorded = True
        signals = cleanup.enter_context(StopSignals())
        window, last_checkpoint, meter = _Window.resumed(state.open_window), (state.step if resume else None), None

        def log_window() -> None:
            nonlocal window
            window.check_finite(state, last_checkpoint)
            if is_main and window.steps:
                record = window.record(state, len(dataset))
                logger.log(record, scalars=_Window.SCALARS)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            window = _Window()

        def checkpoint() -> None:
            nonlocal last_checkpoint
            if last_checkpoint == state.step:  # written already (a stop on a checkpoint step): nothing has changed since
                return
            window.check_finite(state, last_checkpoint, (model, ema))
            state.open_window = window.saved()
            save_checkpoint(out_dir, config=config, model=model, ema=ema, optimizer=optimizer, train_state=dataclasses.asdict(state))
            last_checkpoint = state.step

        def sample_grid() -> Path:
            path, grid = draw_grid()
            logger.image("samples", grid, state.step)
            return path

        def evaluate() -> None:
            nonlocal meter
            from .evaluate import QualityMeter

            # Watching must not change what is trained: building the evaluator draws initial
            # weights from the global RNG, whose state the next steps' noise comes from.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                meter = meter or QualityMeter(tc.dataset, data_dir, progress=False)
                labels = ema_pipe.cycled_labels(tc.eval_n)
                scores = dataclasses.asdict(meter.score(ema_pipe(labels=labels, steps=20, guidance=DEFAULT_GUIDANCE, seed=0), labels))
            record = {"step": state.step, "train_seconds": state.train_seconds} | {f"eval_{k}": v for k, v in scores.items() if v is not None}
            logger.log(record, scalars={f"eval_{k}": f"eval/{k}" for k in ("fid", "label_accuracy", "precision", "recall")})

        def due(every: int) -> bool:  # 0 turns a periodic action off
            return every > 0 and state.step % every == 0

        def what_a_stop_left_undone() -> list[Callable[[], object]]:
            """A stop signal checkpoints the step it finished without that step's grid and
            evaluation (a scheduler's grace period is short), and on a run's last step without its
            last, partial window's record: a resumed run makes them first, from the same EMA
            weights and seeds, so that its records are those of one that never stopped."""
            at_stop = [r for r in read_jsonl(out_dir / METRICS_NAME) if r.get("step") == state.step]
            undone = [sample_grid] if due(tc.sample_every) and not grid_path().exists() else []
            undone += [evaluate] if due(tc.eval_every) and not any(is_eval_record(r) for r in at_stop) else []
            return undone + ([log_window] if finished and window.steps and not any("loss" in r for r in at_stop) else [])

        if finished:
            # Rerunning a finished command is not an error and redoes nothing (not even its last
            # checkpoint): it makes only what a stop on the last step, or a kill after its
            # checkpoint, left undone, and the final grid where it is missing.
            if is_main:
                if undone := what_a_stop_left_undone():
                    logger, bar = open_logger(), _progress_bar(max_steps, tc.minutes, state, enabled=False)
                    for make in undone:
                        make()
                if final_samples and not (out_dir / FINAL_GRID_NAME).is_file():
                    atomic_copy(grid_path() if grid_path().is_file() else draw_grid()[0], out_dir / FINAL_GRID_NAME)
                print(f"simple-dit: {out_dir} is already at its stop (step {state.step}); nothing to train. "
                      "A later --epochs, --max-steps or --minutes continues it", file=sys.stderr, flush=True)  # fmt: skip
            return out_dir / CHECKPOINT_NAME

        order, local_batch = EpochOrder(len(dataset), tc.seed, tc.batch_size, device), tc.batch_size // world
        resident = dataset.to(device)
        model.train()
        # --compile on one GPU also replays each step as one CUDA graph (DDP's gradient hooks stay uncaptured).
        step, compile_seconds = make_step(
            model, forward_model, diffusion, optimizer, *resident.batch(torch.arange(local_batch, device=device)), precision=precision,
            grad_clip=tc.grad_clip, compile=tc.compile, capture=tc.compile and device.type == "cuda" and world == 1,
        )  # fmt: skip
        state.compiled = compile_seconds is not None
        if compile_seconds is not None:
            logger.log({"step": state.step, "compile_seconds": compile_seconds})
        # Drawn from here: the compilation is not a step (nor part of the ETA), and what it prints
        # stays on lines of its own.
        bar = _progress_bar(max_steps, tc.minutes, state, progress and is_main)
        cleanup.callback(bar.close)
        if resume and is_main and state.step:
            for make in what_a_stop_left_undone():
                make()
        while not ((max_steps and state.step >= max_steps) or _time_is_up(tc.minutes, state.train_seconds, world, device)):
            step_start = time.perf_counter()
            x0, y = resident.batch(order.indices(state.step, rank * local_batch, local_batch))
            if rank > 0:
                # The checkpoint holds rank 0's RNG; the others draw each step's noise from a seed
                # of their rank and the step, so that a resumed run draws what an unbroken one did.
                torch.manual_seed(tc.seed + 1_000_003 * rank + state.step)
            lr = lr_at(state.step, tc.lr, tc.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = step(x0, y)
            # Under torchrun, the whole batch's loss (as one process would log it; DDP averaged the
            # gradients already) and a stop signal any process received, so that all stop after this step.
            received = _agree_on_step(loss, signals.received, world, device)
            update_ema(ema, model, ema_decay_at(state.step, tc.ema_decay))
            state.step, state.images_seen = state.step + 1, state.images_seen + tc.batch_size
            window.add(loss, grad_norm, tc.batch_size, lr)
            if due(tc.log_every):
                synchronize(device)
            seconds = time.perf_counter() - step_start
            state.train_seconds += seconds
            window.seconds += seconds
            bar.update(_budget_seconds(bar, seconds) if tc.minutes and not max_steps else 1)

            if due(tc.log_every):
                log_window()
            if received is not None:
                if is_main:
                    checkpoint()
                raise Interrupted(received, f"stopped by {signal.Signals(received).name} at step {state.step}; checkpoint saved, --resume continues")
            if not is_main:
                if due(tc.checkpoint_every):  # where rank 0 checks before it writes, so that a divergence stops every process
                    window.check_finite(state, last_checkpoint, (model, ema))
                    last_checkpoint = state.step
                continue
            if due(tc.sample_every):
                sample_grid()
            if due(tc.eval_every):
                evaluate()
            if due(tc.checkpoint_every):
                checkpoint()

        if is_main:
            checkpoint()  # before the partial window is logged: it stays open for a resumed run
        else:  # the check rank 0 makes before it writes, so that a divergence stops every process
            window.check_finite(state, last_checkpoint, (model, ema))
        log_window()  # the last, partial window: a short run still logs its loss and speed
        if is_main:
            if final_samples:
                atomic_copy(sample_grid(), out_dir / FINAL_GRID_NAME)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the others must not exit (and tear down the group) before rank 0 is done
    return out_dir / CHECKPOINT_NAME


def _flag_device(device: torch.device) -> torch.device | str:
    """Where a flag that processes exchange lives. A CPU flag goes by gloo without waiting for the
    GPU's queue, which would be a host sync every step; a group of NCCL alone (one the caller
    made) sends only CUDA tensors."""
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else "cpu"


def _time_is_up(minutes: float, train_seconds: float, world: int, device: torch.device) -> bool:
    if not minutes:
        return False
    up = train_seconds >= minutes * 60
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(up)], device=_flag_device(device))
        dist.broadcast(flag, src=0)  # rank 0's clock decides, so every rank stops at the same step
        up = bool(flag.item())
    return up


def _agree_on_step(loss: torch.Tensor, received: int | None, world: int, device: torch.device) -> int | None:
    """``loss`` (this process's share of the batch) made in place the mean over every process's,
    and the stop signal that any process has received (torchrun hands one to each, each at its own
    moment), or None. One sum over the processes where the loss lives with the flags (on a CPU);
    on a GPU the loss's own, queued without a host sync, and the flags' over gloo."""
    if world == 1:
        return received
    import torch.distributed as dist

    stops = (signal.SIGTERM, signal.SIGINT)
    flags = torch.tensor([float(received == s) for s in stops], dtype=torch.float64, device=_flag_device(device))
    if loss.device == flags.device:
        summed = torch.cat([loss.reshape(1).double(), flags])
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        loss.copy_(summed[0] / world)
        flags = summed[1:]
    else:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        loss.div_(world)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return next((int(s) for s, n in zip(stops, flags.tolist()) if n > 0), None)


def _progress_bar(max_steps: int, minutes: float, state: TrainState, enabled: bool):
    """Steps done of the total; for a time budget, training seconds of the budget (so the bar has
    a total and an ETA)."""
    from tqdm import tqdm

    if max_steps or not minutes:
        return tqdm(total=max_steps or None, initial=state.step, disable=not enabled, unit="step", dynamic_ncols=True)
    return tqdm(
        total=round(minutes * 60, 1), initial=min(round(state.train_seconds, 1), round(minutes * 60, 1)), disable=not enabled, unit="s", dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training [{elapsed}<{remaining}{postfix}]",
    )  # fmt: skip


def _budget_seconds(bar, seconds: float) -> float:
    """What to add to a time budget's bar: the last step ends past the budget, and tqdm drops the
    total of a bar run past it (its format then fails, and the run with it), so the bar stops at
    the budget."""
    return max(0.0, min(seconds, bar.total - bar.n))
