"""Several runs of one architecture trained as one batched network, in one process.

A small model leaves a GPU mostly idle: a batch-128 dit-seed step is bound by Python dispatch,
not by arithmetic (issue 8). Runs that share a preset and differ in learning rate or seed can
instead train together: their weights are stacked along a new leading dimension and one
``torch.func.vmap`` of the network computes all their losses in each kernel, while every run keeps
its own optimiser, EMA, data order, random draws, logs and checkpoint, in the same formats as
``train.train``, so that evaluation, ``--resume`` and reports see ordinary runs. A run trained
here then differs from the same run trained alone only by the rounding of the batched kernels.

Each run's draws (timesteps, noise, dropped labels) come from its own copy of the global RNG
state, swapped in around them, in the order ``train.train`` makes them. Each step's wall time is
shared equally between the runs it trained, so a run's ``train_seconds`` is its share of the
device: a time budget therefore cannot be given here (a run's clock would depend on its company).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, write_checkpoint_file
from .config import RunConfig, validate_config
from .diffusion import make_process
from .errors import Interrupted, TrainingDiverged, UserError
from .io import atomic_write_together
from .logger import RunLogger
from .models.dit import Attention, plain_attention
from .models.embeddings import LabelEmbedder
from .runtime import autocast, compile_model, deterministic_compiled_kernels, parse_device, rng_state, set_rng_state, synchronize
from .train import (
    EpochOrder, StopSignals, TrainState, _Window, check_resumable, clip_and_step, ema_decay_at, load_training_set, lr_at, planned_steps,
    prepare_output_dir, record_start, start_run, training_precision, update_ema, warm_up_compiled,
)  # fmt: skip

# What runs trained together must share; everything else (lr, seed, warm-up, EMA, clipping,
# weight decay, logging and checkpoint intervals, the stopping step) is each run's own.
SHARED = ("model", "diffusion", "train.batch_size", "train.dataset", "train.precision", "train.compile")


@dataclass
class _Run:
    """One run of the batch: what ``train.train`` keeps in its locals."""

    config: RunConfig
    out_dir: Path
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    order: EpochOrder
    logger: RunLogger
    max_steps: int
    rng: tuple  # its global RNG state (CPU, CUDA) between its draws
    last_checkpoint: int | None
    window: _Window = dataclasses.field(default_factory=_Window)

    @contextlib.contextmanager
    def own_rng(self, device: torch.device):
        outer = rng_state(device)
        set_rng_state(self.rng, device)
        try:
            yield
        finally:
            self.rng = rng_state(device)
            set_rng_state(outer, device)

    def due(self, every: int) -> bool:  # 0 turns a periodic action off
        return every > 0 and self.state.step % every == 0

    def log_window(self, num_examples: int, together: int) -> None:
        self.window.check_finite(self.state, self.last_checkpoint)
        if self.window.steps:
            self.logger.log(self.window.record(self.state, num_examples) | {"trained_together": together}, scalars=_Window.SCALARS)
        self.window = _Window()

    def checkpoint_due(self) -> bool:
        """Whether the run has a step to checkpoint (not at a stop on a checkpoint step, written
        already); raises TrainingDiverged where nothing may be written."""
        if self.last_checkpoint == self.state.step:
            return False
        self.window.check_finite(self.state, self.last_checkpoint, (self.model, self.ema))
        return True

    def write_checkpoint(self, path: str, device: torch.device) -> None:
        self.state.open_window = self.window.saved()
        with self.own_rng(device):  # the checkpoint stores the global RNG: this run's
            write_checkpoint_file(path, config=self.config, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                  train_state=dataclasses.asdict(self.state))  # fmt: skip


def checkpoint_together(runs: list[_Run], device: torch.device) -> None:
    """The runs' checkpoints (each ``checkpoint_due``), moved into place together once all are on
    disk: a kill between two runs' writes used to leave one at its new step and one at its old,
    which a resumed comparison then trained apart, in other company, where a UNet's batched bf16
    kernels round otherwise. A kill between two renames is finished by the comparison's next lock
    (``io.remove_stale_temporaries``)."""
    atomic_write_together([(run.out_dir / CHECKPOINT_NAME, functools.partial(run.write_checkpoint, device=device)) for run in runs])
    for run in runs:
        run.last_checkpoint = run.state.step


class BatchedLoss:
    """The training losses of K networks of one architecture in one pass: their parameters and
    buffers stacked along a leading dimension of size K, every input too. Returns the K losses and
    the buffers as the pass left them (BatchNorm's running statistics), as new tensors: a compiled
    step that changed its inputs in place would be kept out of CUDA graphs."""

    def __init__(self, model: torch.nn.Module, diffusion):
        self.diffusion = diffusion
        # A weightless copy that only lends its forward code; each run's labels arrive dropped
        # already (drawn with that run's RNG), so the copy drops none itself.
        self.network = copy.deepcopy(model).to("meta")
        for module in self.network.modules():
            if isinstance(module, LabelEmbedder):
                module.dropout_prob = 0.0
            # On CUDA, vmap cannot batch two fused kernels: the memory-efficient attention's
            # backward ("LSE is not correctly aligned") and BatchNorm, whose backend choice asks
            # for the input's memory format ("NYI: querying is_contiguous inside of vmap").
            elif isinstance(module, Attention):
                module.__class__ = _VmapAttention
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.__class__ = _VmapBatchNorm2d
        if hasattr(self.network, "memory_format"):
            # Stacked weights are ordinary contiguous tensors, and vmap cannot query channels-last.
            self.network.memory_format = torch.contiguous_format

    def __call__(self, params: dict, buffers: dict, x0, y, t, noise) -> tuple[torch.Tensor, dict]:
        from torch.func import functional_call, vmap

        def one(params, buffers, x0, y, t, noise):
            buffers = {name: buffer.clone() for name, buffer in buffers.items()}  # what the forward pass updates

            def network(*inputs):
                return functional_call(self.network, (params, buffers), inputs)

            return self.diffusion.loss_at(network, x0, y, t, noise), buffers

        return vmap(one)(params, buffers, x0, y, t, noise)


class _VmapAttention(Attention):
    """DiT's attention from plain ops on every device (same parameters)."""

    attend = staticmethod(plain_attention)


class _VmapBatchNorm2d(torch.nn.BatchNorm2d):
    """``BatchNorm2d`` in training mode from plain ops (same parameters and buffers, same
    arithmetic: normalised by the biased batch variance, running variance updated with the
    unbiased one), the statistics in fp32 as the native kernels keep them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            mean, var = xf.mean((0, 2, 3)), xf.var((0, 2, 3), correction=0)
            with torch.no_grad():
                n = xf.numel() // xf.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * (n / max(n - 1, 1)), self.momentum)
                self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (xf * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


def stacked(models: list[torch.nn.Module]) -> tuple[dict, dict]:
    """The parameters and buffers of ``models`` (one architecture), each stacked along a new
    leading dimension; gradients flow back to each model's own parameters."""
    named = [dict(model.named_parameters()) for model in models]
    params = {name: torch.stack([p[name] for p in named]) for name in named[0]}
    named = [dict(model.named_buffers()) for model in models]
    return params, {name: torch.stack([b[name] for b in named]) for name in named[0]}


def train_step_together(
    batched_loss, models: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], x0: torch.Tensor, y: torch.Tensor,
    t: torch.Tensor, noise: torch.Tensor, *, lrs: list[float], precision: str, grad_clips: list[float],
) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """One optimiser step of each of K models on its slice of the stacked batch (x0, y, t, noise:
    leading dimension K), as ``train.train_step`` takes one; training and ``simple-dit bench
    --runs-together`` time this same function. Returns the K losses and gradient norms as device
    tensors."""
    for optimizer, lr in zip(optimizers, lrs):
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = lr
    params, buffers = stacked(models)
    with autocast(x0.device, precision):
        losses, buffers = batched_loss(params, buffers, x0, y, t, noise)
    with torch.no_grad():  # BatchNorm's running statistics, as the step left them
        own = [b for model in models for b in model.buffers()]
        torch._foreach_copy_(own, [buffers[name][k] for k, model in enumerate(models) for name, _ in model.named_buffers()])
    # Dropped before the backward, as in the compiled warm-up: CUDA-graph trees re-record a graph
    # when a different set of its earlier outputs is still alive.
    del buffers
    losses.sum().backward()  # each model's loss reaches only its own slice of the stack
    return losses.detach(), [clip_and_step(optimizer, clip) for optimizer, clip in zip(optimizers, grad_clips)]


def _label_embedder(model: torch.nn.Module) -> LabelEmbedder | None:
    return next((m for m in model.modules() if isinstance(m, LabelEmbedder)), None)


def _check_together(configs: list[RunConfig]) -> None:
    if not configs:
        raise UserError("no runs to train together")
    first = configs[0].to_dict()
    for config in configs:
        validate_config(config)
        tc, d = config.train, config.to_dict()
        for key in SHARED:
            section, _, field = key.partition(".")
            a, b = (first[section][field], d[section][field]) if field else (first[section], d[section])
            if a != b:
                raise UserError(f"runs trained together must share their {key.replace('train.', '')}: {config.preset} differs")
        if tc.minutes:
            raise UserError("runs trained together stop at a number of steps or epochs, not --minutes: each run's clock would depend on its company")
        if tc.sample_every or tc.eval_every:
            raise UserError("runs trained together draw no sample grids or evaluations while training; set sample_every and eval_every to 0")


def train_together(
    runs: list[tuple[RunConfig, str | Path, bool]], *, data_dir: str | None = None, device: torch.device | str | None = None
) -> dict[Path, TrainingDiverged]:
    """Train each (config, out_dir, resume) of ``runs`` to its stopping step, all as one batched
    network; return the runs that diverged (each stopped at its divergence, as ``train.train``
    stops, its last checkpoint kept), by directory. The others end with a checkpoint.
    Raises ``Interrupted`` after SIGINT/SIGTERM, every run checkpointed."""
    configs = [config for config, _, _ in runs]
    _check_together(configs)
    if len({Path(out_dir).resolve() for _, out_dir, _ in runs}) != len(runs):
        raise UserError("runs trained together need one directory each")
    device = parse_device(device)
    tc0 = configs[0].train
    precision = training_precision(tc0.precision, device)
    diverged: dict[Path, TrainingDiverged] = {}

    with contextlib.ExitStack() as cleanup:
        dataset = load_training_set(configs[0], data_dir)
        members: list[_Run] = []
        for config, out_dir, resume in runs:
            out_dir, tc = Path(out_dir), config.train
            cleanup.callback(prepare_output_dir(out_dir, resume).release)
            if resume:  # as train() resumes: the recipe the checkpoint was trained with, to a later stop
                check_resumable(config, out_dir)
            max_steps = planned_steps(tc, len(dataset))  # never 0: --minutes is refused above
            model, ema, optimizer, state = start_run(config, out_dir, resume=resume, device=device, stop_step=max_steps)
            record_start(config, out_dir, state)
            logger = RunLogger(out_dir, enabled=True, config=config.to_dict())
            cleanup.callback(logger.close)
            order = EpochOrder(len(dataset), tc.seed, tc.batch_size, device)
            members.append(_Run(config, out_dir, model.train(), ema, optimizer, state, order, logger, max_steps,
                                rng_state(device), state.step if resume else None, _Window.resumed(state.open_window)))  # fmt: skip
        signals = cleanup.enter_context(StopSignals())
        diffusion = make_process(configs[0].diffusion).ready_for(device)
        loss_fn = BatchedLoss(members[0].model, diffusion)
        compiled = compile_model(loss_fn, device) if tc0.compile else None
        embedder = _label_embedder(members[0].model)
        resident = dataset.to(device)

        def draws(active: list[_Run], own: bool = True) -> list[torch.Tensor]:
            """The stacked batch, timesteps, noise and dropped labels of ``active``, each run's
            drawn with its own RNG (``own=False``: the global one, for the compiler's warm-up)."""
            batch = []
            for run in active:
                x0, y = resident.batch(run.order.indices(run.state.step))
                with run.own_rng(device) if own else contextlib.nullcontext():
                    t, noise = diffusion.training_draws(x0)
                    if embedder is not None and embedder.dropout_prob > 0:
                        y = embedder.drop_labels(y)
                batch.append((x0, y, t, noise))
            return [torch.stack(column) for column in zip(*batch)]

        def checkpoint(runs: list[_Run], *, close_finished: bool = False) -> None:
            """The checkpoints of ``runs`` that have a step to write, together; with
            ``close_finished``, then the last, partial window of each run at its stop (the
            checkpoint keeps the window open for a resumed run)."""
            due = []
            for run in runs:
                try:
                    if run.out_dir not in diverged and run.checkpoint_due():
                        due.append(run)
                except TrainingDiverged as e:
                    diverged[run.out_dir] = e
            checkpoint_together(due, device)
            for run in runs if close_finished else []:
                try:
                    if run.out_dir not in diverged and run.state.step >= run.max_steps:
                        run.log_window(len(dataset), together)
                except TrainingDiverged as e:
                    diverged[run.out_dir] = e

        batched, warmed_for, together = loss_fn, None, len(members)
        while active := [m for m in members if m.state.step < m.max_steps and m.out_dir not in diverged]:
            models = [run.model for run in active]
            if compiled is not None and warmed_for != len(active):
                # A new number of runs (one finished or diverged) is a new shape: compiled and
                # warmed up before the clock.
                x0, y, t, noise = draws(active, own=False)

                def warm_up_loss():
                    with autocast(device, precision):
                        return compiled(*stacked(models), x0, y, t, noise)[0]  # the losses; the statistics are restored

                seconds = warm_up_compiled(warm_up_loss, models, device)
                if seconds is None:  # the compiler failed (said on stderr): eager from here on
                    batched, compiled = loss_fn, None
                else:
                    batched, warmed_for = compiled, len(active)
                    for run in active:
                        run.logger.log({"step": run.state.step, "compile_seconds": seconds})
            step_start, together = time.perf_counter(), len(active)
            for run in active:
                run.state.compiled = batched is compiled
            lrs = [lr_at(run.state.step, run.config.train.lr, run.config.train.warmup_steps) for run in active]
            with deterministic_compiled_kernels(device) if batched is compiled else contextlib.nullcontext():
                losses, grad_norms = train_step_together(
                    batched, models, [run.optimizer for run in active], *draws(active), lrs=lrs, precision=precision,
                    grad_clips=[run.config.train.grad_clip for run in active],
                )  # fmt: skip
            for k, run in enumerate(active):
                tc = run.config.train
                update_ema(run.ema, run.model, ema_decay_at(run.state.step, tc.ema_decay))
                run.state.step, run.state.images_seen = run.state.step + 1, run.state.images_seen + tc.batch_size
                run.window.add(losses[k], grad_norms[k], tc.batch_size, lrs[k])
            if any(run.due(run.config.train.log_every) for run in active):
                synchronize(device)
            share = (time.perf_counter() - step_start) / len(active)
            for run in active:
                run.state.train_seconds += share
                run.window.seconds += share

            for run in active:
                try:
                    if run.due(run.config.train.log_every):
                        run.log_window(len(dataset), together)
                except TrainingDiverged as e:
                    diverged[run.out_dir] = e
            checkpoint([run for run in active if run.due(run.config.train.checkpoint_every)])
            if signals.received is not None:
                # Every run checkpointed, and those that reached their stop before the signal
                # closed as the loop's end closes them (a resumed comparison does not revisit them).
                checkpoint(members, close_finished=True)
                name = signal.Signals(signals.received).name
                raise Interrupted(signals.received, f"stopped by {name}; every run trained together checkpointed")

        checkpoint(members, close_finished=True)
    return diverged
