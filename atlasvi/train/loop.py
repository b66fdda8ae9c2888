"""The one training loop: the same function in a plain process and in every Ray Train worker.

fit() reads top to bottom: restore the last checkpoint if there is one; for each epoch, minibatches
-> loss (KL weight from the warm-up schedule) -> backward -> clip -> step; the held-out ELBO at KL
weight 1; a record per epoch; early stopping; a checkpoint. A module with an `adversary` (an nn.Module, e.g.
totalVI's batch classifier) has it trained by a second optimizer on `LossOutput.adversary_loss`, backpropagated
with the loss (scvi-tools' AdversarialTrainingPlan; see `atlasvi.models.adversary`). A checkpoint holds the model, the
optimizer, the epoch and step, both loaders' positions and the RNG states, so resuming continues
exactly (on CPU the per-step losses after a resume are those of the uninterrupted run).

Distributed (torch.distributed initialised, e.g. by Ray Train): the module trains wrapped in DDP (no
find_unused_parameters: modules build no unused parameter), every rank reads its own shard, epoch
figures and the held-out ELBO are all-reduced over ranks, rank 0 alone writes the checkpoint, which
holds every rank's RNG state; each rank resumes its own.
"""

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.optim import optimizer as torch_optimizer

from atlasvi.data import Minibatch, StreamingLoader
from atlasvi.errors import AtlasviError
from atlasvi.models import LossOutput

CHECKPOINT_NAME = "last.pt"


class TrainConfig(BaseModel):
    """Optimisation; the defaults are scvi-tools' (Adam lr 1e-3, eps 0.01, weight decay 1e-6, KL warm-up 400 epochs).

    max_epochs None: scvi-tools' rule, min(round(20000 / n_train_cells * 400), 400).
    n_epochs_kl_warmup / n_steps_kl_warmup: linear warm-up of the KL weight by epochs, or else by steps;
    kl_warmup_steps_per_cell: with neither set, n_steps_kl_warmup = floor(it x cells), the cells of the store's
    split, training and held-out, as scvi-tools counts every cell of the AnnData (scvi-tools' totalVI: 0.75 x cells).
    optimizer, lr, weight_decay, eps: torch's Adam (L2 penalty in the gradient) or AdamW (decoupled decay).
    early_stopping_monitor: the held-out figure early stopping watches, the -ELBO ("elbo", scvi-tools'
    default) or the reconstruction term alone ("reconstruction").
    reduce_lr_on_plateau: multiply the learning rate by lr_factor when the held-out -ELBO has not fallen by more than
    lr_threshold (absolute) for lr_patience epochs, down to lr_min (scvi-tools' TrainingPlan: torch's
    ReduceLROnPlateau, threshold_mode "abs", on elbo_validation; its defaults).
    A model's registry entry may give other defaults (`ModelEntry.train_defaults`, applied by the job and the API;
    `loader_defaults` for the LoaderConfig).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_epochs: int | None = Field(default=None, gt=0)
    optimizer: Literal["Adam", "AdamW"] = "Adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-6, ge=0)
    eps: float = Field(default=0.01, gt=0)
    n_epochs_kl_warmup: int | None = Field(default=400, ge=0)
    n_steps_kl_warmup: int | None = Field(default=None, ge=0)
    kl_warmup_steps_per_cell: float | None = Field(default=None, gt=0)
    min_kl_weight: float = Field(default=0.0, ge=0)
    max_kl_weight: float = Field(default=1.0, ge=0)
    gradient_clip_norm: float | None = Field(default=None, gt=0)
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    early_stopping: bool = False
    early_stopping_monitor: Literal["elbo", "reconstruction"] = "elbo"
    early_stopping_patience: int = Field(default=45, gt=0)
    early_stopping_min_delta: float = Field(default=0.0, ge=0)
    reduce_lr_on_plateau: bool = False
    lr_factor: float = Field(default=0.6, gt=0, lt=1)
    lr_patience: int = Field(default=30, gt=0)
    lr_threshold: float = Field(default=0.0, ge=0)
    lr_min: float = Field(default=0.0, ge=0)
    checkpoint_every_n_epochs: int = Field(default=1, gt=0)
    amp: bool = True
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _kl_weights_ordered(self) -> "TrainConfig":
        if self.min_kl_weight > self.max_kl_weight:
            raise ValueError(
                f"min_kl_weight ({self.min_kl_weight}) is above max_kl_weight ({self.max_kl_weight}); "
                "the warm-up rises from min_kl_weight to max_kl_weight"
            )
        return self

    def epochs_for(self, n_train_cells: int) -> int:
        """max_epochs, else `default_max_epochs(n_train_cells)`."""
        return self.max_epochs or default_max_epochs(n_train_cells)

    def resolved(self, n_cells: int) -> "TrainConfig":
        """The config with kl_warmup_steps_per_cell turned into n_steps_kl_warmup for `n_cells` (the training and
        held-out cells together: scvi-tools counts every cell of the AnnData, validation included), where no
        warm-up length is set."""
        if self.kl_warmup_steps_per_cell is None or self.n_epochs_kl_warmup or self.n_steps_kl_warmup:
            return self
        steps = math.floor(self.kl_warmup_steps_per_cell * n_cells)
        return self.model_copy(update={"n_steps_kl_warmup": steps})


def default_max_epochs(n_train_cells: int) -> int:
    """scvi-tools' default max_epochs, min(round(20000 / n * 400), 400), with n the TRAINING cells.

    scvi-tools counts every cell of the AnnData (adata.n_obs); atlasvi counts the cells the model trains on
    (the store's rows less the held-out ones), so a run's epochs do not depend on validation_fraction's cells.
    """
    return min(round(20000 / n_train_cells * 400), 400)


def pretrained_max_epochs(n_cells: int) -> int:
    """scvi-tools' scANVI default for a model started from trained weights: a third of the rule, 2 to 10.

    n_cells: EVERY cell of the store, as scvi-tools' SCANVI (adata.n_obs) and `SCANVI.fit` count them.
    """
    return int(min(10, max(2, round(default_max_epochs(n_cells) / 3.0))))


def kl_weight(config: TrainConfig, epoch: int, step: int) -> float:
    """scvi-tools' linear KL warm-up: min -> max over n_epochs_kl_warmup epochs (or n_steps_kl_warmup steps)."""
    slope = config.max_kl_weight - config.min_kl_weight
    if config.n_epochs_kl_warmup:
        if epoch < config.n_epochs_kl_warmup:
            return config.min_kl_weight + slope * epoch / config.n_epochs_kl_warmup
    elif config.n_steps_kl_warmup and step < config.n_steps_kl_warmup:
        return config.min_kl_weight + slope * step / config.n_steps_kl_warmup
    return config.max_kl_weight


class KLWarmupWarning(UserWarning):
    """The KL warm-up outlasts the run: it ends below max_kl_weight."""


def kl_warmup_shortfall(config: TrainConfig, n_epochs: int, steps_per_epoch: int) -> str | None:
    """Why the run's KL warm-up outlasts it (naming the KL weight of its last step), or None."""
    if config.n_epochs_kl_warmup:
        warmup, length, unit = config.n_epochs_kl_warmup, n_epochs, "epochs"
    elif config.n_steps_kl_warmup:
        warmup, length, unit = config.n_steps_kl_warmup, n_epochs * steps_per_epoch, "steps"
    else:
        return None
    if warmup <= length:
        return None
    last = kl_weight(config, n_epochs - 1, n_epochs * steps_per_epoch - 1)
    return (
        f"the KL warm-up ({warmup} {unit}) outlasts the run ({length} {unit}): it ends at KL weight {last:.3g}, "
        f"not {config.max_kl_weight:g}; shorten the warm-up (train.n_{unit}_kl_warmup) or train longer"
    )


def training_seed(seed: int, rank: int) -> int:
    """The torch seed of one rank's training draws (dropout, latent samples): the one 64-bit word of numpy's
    SeedSequence([seed, rank]).generate_state(1, uint64). The initial weights are drawn from torch seed `seed`
    itself; this keeps training off their sequence (scvi-tools seeds once, so its training draws follow the
    initial weights' instead of repeating them) and gives every rank its own stream."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


class Trainable(Protocol):
    """What fit() needs of a module: its inputs from a minibatch, and forward(inputs, kl_weight) = loss."""

    def unpack(self, batch: Minibatch): ...

    def loss(self, inputs, kl_weight: float = 1.0) -> LossOutput: ...

    def __call__(self, inputs, kl_weight: float = 1.0) -> LossOutput: ...


def _world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) in a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(values)
    return values


class TrainingDiverged(AtlasviError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class EpochRecord:
    """One epoch's figures; ELBO terms are per cell in nats, validation at KL weight 1.

    extra_metrics: the module's extra training metrics (LossOutput.extra_metrics), cell-weighted epoch means.
    """

    epoch: int
    kl_weight: float
    train_loss: float
    train_reconstruction: float
    train_kl: float
    validation_elbo: float
    validation_reconstruction: float
    validation_kl: float
    cells_per_second: float
    seconds: float
    step_losses: list[float] = field(default_factory=list)
    extra_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Progress:
    epoch: int = 0
    step: int = 0
    best_validation: float = math.inf
    epochs_without_improvement: int = 0
    history: list[EpochRecord] = field(default_factory=list)


def _fused(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """{"fused": True} where torch has a fused Adam step for every parameter (floating point, on CPU or CUDA): one
    kernel for all parameters, ~4x faster than the per-tensor step on one CPU thread (measured, scVI's 17 tensors);
    else {} (torch's default)."""
    fusable = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fusable else {}


def _optimizer(module: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The model's optimizer, over every trainable parameter but its adversary's (fused step where torch has one)."""
    cls = torch.optim.Adam if config.optimizer == "Adam" else torch.optim.AdamW
    adversary = {id(p) for p in _adversary_parameters(module)}
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in adversary]
    return cls(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, **_fused(params))


def _step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() for the fused Adam / AdamW that `_optimizer` builds: torch's fused kernel called as torch's
    step calls it (the same arguments, so the same bits), without the ~0.2-0.3 ms of Python around it per step
    (hooks, profiler scope, per-parameter checks and grouping: ~1.5% of a scVI step at batch 128, measured). Anything
    else goes through optimizer.step(): not Adam / AdamW, not fused, several groups or devices / dtypes, a parameter
    without a gradient or state (the first step makes it), hooks, or options this call does not pass (amsgrad,
    maximize, capturable, differentiable, a tensor learning rate or betas)."""
    groups = optimizer.param_groups
    group = groups[0]
    params = group["params"]
    lean = (
        type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
        and len(groups) == 1
        and group["fused"]
        and not (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"])
        and isinstance(group["lr"], float)
        and all(isinstance(beta, float) for beta in group["betas"])
        and not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)
        and not (torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks)
        and all(p.grad is not None and len(optimizer.state[p]) == 3 for p in params)
        and len({(p.device, p.dtype) for p in params}) == 1
    )
    if not lean:
        optimizer.step()
        return
    states = [optimizer.state[p] for p in params]
    steps = [state["step"] for state in states]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))  # older torch: no key
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    with torch.no_grad():
        torch._foreach_add_(steps, 1)
        kernel(
            params,
            [p.grad for p in params],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


def _adversary_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    adversary = getattr(module, "adversary", None)
    return [p for p in adversary.parameters() if p.requires_grad] if adversary is not None else []


def _adversary_optimizer(module: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer | None:
    """scvi-tools' optimizer of the adversarial classifier: Adam, lr 1e-3, eps 0.01, the run's weight decay."""
    params = _adversary_parameters(module)
    if not params:
        return None
    return torch.optim.Adam(params, lr=1e-3, eps=0.01, weight_decay=config.weight_decay, **_fused(params))


def evaluate(module: Trainable, loader: Iterable[Minibatch], device: torch.device) -> tuple[float, float, float]:
    """Mean -ELBO, reconstruction and KL per held-out cell at KL weight 1 (each cell counted once)."""
    module.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # -ELBO, reconstruction, KL sums; cells
    seen: set[int] = set()
    with torch.no_grad():
        for batch in loader:
            output = module.loss(module.unpack(batch.to(device)))
            fresh = []
            for row in batch.rows.tolist():  # padding can repeat a cell within one batch too
                fresh.append(row not in seen)
                seen.add(row)
            fresh = torch.tensor(fresh, device=device)
            kl = sum(output.kl_local.values())
            for i, values in enumerate((output.negative_elbo, output.reconstruction_loss, kl)):
                totals[i] += values[fresh].double().sum()
    module.train()
    totals[3] = len(seen)
    totals = _sum_over_ranks(totals).cpu()  # ranks read disjoint held-out cells
    return tuple((totals[:3] / max(totals[3].item(), 1)).tolist())


def _rng_states() -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG states, gathered (a collective: every rank calls it)."""
    mine = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    ranks = [mine]
    if _world()[1] > 1:
        ranks = [None] * _world()[1]
        dist.all_gather_object(ranks, mine)
    return {"cpu": [r["cpu"] for r in ranks], "cuda": [r["cuda"] for r in ranks]}


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """torch's ReduceLROnPlateau as scvi-tools' TrainingPlan builds it, or None without reduce_lr_on_plateau."""
    if not config.reduce_lr_on_plateau:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        patience=config.lr_patience,
        factor=config.lr_factor,
        threshold=config.lr_threshold,
        min_lr=config.lr_min,
        threshold_mode="abs",
    )


def _save(
    path: Path,
    module,
    optimizers: list,
    scheduler,
    progress: _Progress,
    train: StreamingLoader,
    validation: StreamingLoader,
    rng: dict,
):
    """Atomic: write a sibling, then rename over the last checkpoint (rank 0 only)."""
    payload = {
        "model": module.state_dict(),
        "optimizer": optimizers[0].state_dict(),
        "adversary_optimizer": optimizers[1].state_dict() if optimizers[1] is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "progress": {k: v for k, v in asdict(progress).items() if k != "history"},
        "history": [asdict(r) for r in progress.history],
        "train_loader": train.state_dict(),
        "validation_loader": validation.state_dict(),
        "rng_cpu": rng["cpu"],
        "rng_cuda": rng["cuda"],
    }
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _restore(
    path: Path, module, optimizers: list, scheduler, train: StreamingLoader, validation: StreamingLoader
) -> _Progress:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(payload["model"])
    optimizers[0].load_state_dict(payload["optimizer"])
    if optimizers[1] is not None:
        optimizers[1].load_state_dict(payload["adversary_optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    train.load_state_dict(payload["train_loader"])
    validation.load_state_dict(payload["validation_loader"])
    rank, world_size = _world()
    if len(payload["rng_cpu"]) != world_size:
        raise ValueError(f"{path} was written by {len(payload['rng_cpu'])} ranks, this run has {world_size}")
    torch.set_rng_state(payload["rng_cpu"][rank])
    if payload["rng_cuda"][rank]:
        torch.cuda.set_rng_state_all(payload["rng_cuda"][rank])
    return _Progress(**payload["progress"], history=[EpochRecord(**r) for r in payload["history"]])


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[EpochRecord]]:
    """(model weights, epoch records) of a checkpoint written by fit (no code from the file runs)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload["model"], [EpochRecord(**r) for r in payload["history"]]


def fit(
    module: Trainable,
    train: StreamingLoader,
    validation: StreamingLoader,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
) -> list[EpochRecord]:
    """Train `module` (already on its device) on `train`, evaluating on `validation`; returns the epoch records.

    With checkpoint_dir, a checkpoint is written every `checkpoint_every_n_epochs` epochs and an existing
    one is resumed from; on_epoch_end(record) runs after the epoch's checkpoint, on every rank. Raises
    TrainingDiverged naming the epoch, the step and the last good checkpoint.

    Every draw of the run (dropout, the latent samples) comes from `training_seed(config.seed, rank)`, or from the
    checkpoint's RNG states, in a scope of its own: the caller's global RNG state is neither read nor changed.
    Warns (KLWarmupWarning) when the KL warm-up outlasts the run.
    """
    device = next(module.parameters()).device
    config = config.resolved(train.sampler.n_cells + validation.sampler.n_cells)  # scvi-tools: every cell
    steps_per_batch = 2 if _adversary_parameters(module) else 1  # see _fit
    shortfall = kl_warmup_shortfall(config, config.epochs_for(train.sampler.n_cells), len(train) * steps_per_batch)
    if shortfall is not None and _world()[0] == 0:
        warnings.warn(shortfall, KLWarmupWarning, stacklevel=2)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _fit(module, train, validation, config, checkpoint_dir, on_epoch_end)


def _fit(
    module: Trainable,
    train: StreamingLoader,
    validation: StreamingLoader,
    config: TrainConfig,
    checkpoint_dir: Path | None,
    on_epoch_end: Callable[[EpochRecord], None] | None,
) -> list[EpochRecord]:
    device = next(module.parameters()).device
    rank, world_size = _world()
    optimizer, adversary_optimizer = _optimizer(module, config), _adversary_optimizer(module, config)
    optimizers = [optimizer, adversary_optimizer]
    scheduler = _scheduler(optimizer, config)
    checkpoint = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None
    if checkpoint is not None and checkpoint.exists():
        progress = _restore(checkpoint, module, optimizers, scheduler, train, validation)
    else:
        torch.manual_seed(training_seed(config.seed, rank))
        progress = _Progress()
    # DDP broadcasts rank 0's parameters at construction, so every rank starts from the same model
    model = torch.nn.parallel.DistributedDataParallel(module) if world_size > 1 else module
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda")
    max_epochs = config.epochs_for(train.sampler.n_cells)
    # scvi-tools' step-based KL warm-up counts Lightning's global_step, the optimizer steps: with the adversarial
    # classifier's optimizer (AdversarialTrainingPlan's manual optimization) two per minibatch, so the warm-up
    # (and kappa = 1 - kl_weight) runs at twice the minibatch pace; measured: 20 global steps, KL weight 0.018,
    # after 10 minibatches with the adversary, 10 and 0.009 without
    steps_per_batch = 2 if adversary_optimizer is not None else 1
    module.train()
    while progress.epoch < max_epochs:
        epoch, started = progress.epoch, time.perf_counter()
        weight = kl_weight(config, epoch, progress.step * steps_per_batch)
        sums, cells, step_losses = torch.zeros(3, dtype=torch.float64, device=device), 0, []
        extra: dict[str, torch.Tensor] = {}
        for batch in train:
            weight = kl_weight(config, epoch, progress.step * steps_per_batch)
            with autocast:
                output = model(module.unpack(batch.to(device, non_blocking=True)), kl_weight=weight)
            if not torch.isfinite(output.loss):
                last = f"{checkpoint} (epoch {progress.epoch})" if checkpoint and checkpoint.exists() else "none"
                raise TrainingDiverged(
                    f"loss is {output.loss.item()} at epoch {epoch}, step {progress.step}; last good checkpoint: {last}"
                )
            adversarial = adversary_optimizer is not None and output.adversary_loss is not None
            for opt in filter(None, optimizers):
                opt.zero_grad(set_to_none=True)
            objective = output.loss * output.objective_scale  # x 1.0 is exact: other methods' steps unchanged
            (objective + output.adversary_loss if adversarial else objective).backward()
            if config.gradient_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], config.gradient_clip_norm)
            _step(optimizer)
            if adversarial:
                _step(adversary_optimizer)
            progress.step += 1
            # kept on the device: one host sync per epoch, not several per step
            loss = output.loss.detach()
            step_losses.append(loss)
            n = len(batch)
            kl = sum(output.kl_local.values()).detach()
            sums += torch.stack([loss * n, output.reconstruction_loss.detach().sum(), kl.sum()]).double()
            for name, value in output.extra_metrics.items():
                extra[name] = extra.get(name, 0.0) + value.detach().double() * n
            cells += n
        seconds = time.perf_counter() - started
        validation_elbo, validation_reconstruction, validation_kl = evaluate(module, validation, device)
        names = sorted(extra)
        totals = _sum_over_ranks(
            torch.cat(
                [sums, torch.tensor([cells], dtype=torch.float64, device=device), *(extra[k].view(1) for k in names)]
            )
        )
        means = (totals / max(totals[3].item(), 1)).cpu().tolist()
        train_loss, train_reconstruction, train_kl = means[:3]
        cells = int(totals[3].item())
        record = EpochRecord(
            epoch, weight, train_loss, train_reconstruction, train_kl, validation_elbo, validation_reconstruction,
            validation_kl, cells / seconds, seconds, torch.stack(step_losses).tolist() if step_losses else [],
            dict(zip(names, means[4:], strict=True)),
        )  # fmt: skip
        progress.history.append(record)
        progress.epoch += 1
        if scheduler is not None:
            scheduler.step(validation_elbo)
        monitored = validation_elbo if config.early_stopping_monitor == "elbo" else validation_reconstruction
        if monitored < progress.best_validation - config.early_stopping_min_delta:
            progress.best_validation, progress.epochs_without_improvement = monitored, 0
        else:
            progress.epochs_without_improvement += 1
        stop = config.early_stopping and progress.epochs_without_improvement >= config.early_stopping_patience
        if checkpoint is not None and (progress.epoch % config.checkpoint_every_n_epochs == 0 or stop):
            rng = _rng_states()
            if rank == 0:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                _save(checkpoint, module, optimizers, scheduler, progress, train, validation, rng)
        if on_epoch_end is not None:
            on_epoch_end(record)  # after the checkpoint: the callback may hand it on (Ray Train reports it)
        if stop:
            break
    return progress.history
