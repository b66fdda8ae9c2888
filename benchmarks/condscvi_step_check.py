"""CondSCVI many-step check: atlasvi's and scvi-tools 1.4.2's training loops from the same weights, on the same
minibatches, with the same dropout masks and the same noise.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/condscvi_step_check.py --dataset pdac --epochs 30 --seed 0

The reference of benchmarks/destvi_real.py's pair (`--dataset`; its --n-genes HVGs, prepared by
benchmarks/destvi_fidelity.py's `real`), built into an atlasvi store as destvi_fidelity's runs build it. Runs, one
after the other (one torch thread each):

- atlasvi: CondSCVI(store, seed).fit with the settings of destvi_fidelity's runs (CondSCVI.train's defaults: Adam lr
  1e-3, eps 0.01, weight decay 1e-6; the KL warm-up scaled with the epochs as `warmups` scales it; one held-out cell,
  the nearest atlasvi comes to scvi-tools' train_size 1; batch 128, loader seed); its initial weights are saved for
  scvi-tools, its minibatches and held-out cell recorded;
- scvi-tools: CondSCVI.train (its TrainingPlan under Lightning) from atlasvi's initial weights, its training loader
  replaying atlasvi's minibatches in order (each step's counts checked against the recorded cells'), atlasvi's
  held-out cell as validation (external_indexing; scored every epoch, which scvi-tools skips by default), as many
  epochs;
- atlasvi ulp (the float-drift reference): atlasvi's run from its initial weights x (1 + s 2^-23), s = +-1 drawn per
  entry: the same run but for one rounding of every weight;
- atlasvi unfused: atlasvi's run with torch's per-tensor Adam step (what scvi-tools' plan gets on CPU) in place of
  the fused one atlasvi's loop builds: the same update, rounded as scvi-tools rounds it.

In every run each nn.Dropout in training mode applies the mask of its call: call c (in the order the layers run)
of training step k keeps the entries where default_rng([DROPOUT_SEED, k, c]).random(shape) >= p, scaled by 1 / (1 -
p) (torch's dropout, with a mask both tools share; the rates are each tool's own, compared), and every
reparametrised draw is the step's (benchmarks/multivi_step_check.py's: loc + scale x eps_k in training step k; the
mean in validation). Recorded per step: the loss, the KL weight, SAMPLED fixed entries of every weight (all of a
smaller tensor), under scvi-tools' names; every weight after the steps of SNAPSHOTS and the last. At the end, one
evaluator (atlasvi's module, eval mode, z at the posterior mean) scores every run's final weights on all the
reference's cells: the reconstruction NLL per cell, per type, and the paired per-cell difference from atlasvi's run.
The tools train alike if their difference stays at the reference's size. Writes
results/condscvi_step_check_{dataset}.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.multivi_step_check import (
    SNAPSHOTS,
    _dropout_rates,
    _snapshot_differences,
    _step_differences,
    _step_noise,
    _StepRecord,
    replay_splitter,
    snapshot_table,
    step_table,
)

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "condscvi_step_check"
SAMPLED = 256  # entries of each tensor recorded before every step
DROPOUT_SEED = 11
RUNS = ("atlasvi", "scvi_tools", "atlasvi_ulp", "atlasvi_unfused")
PAIRS = {
    "atlasvi - scvi-tools": ("atlasvi", "scvi_tools"),
    "atlasvi - atlasvi ulp (float-drift reference)": ("atlasvi", "atlasvi_ulp"),
    "atlasvi unfused - scvi-tools": ("atlasvi_unfused", "scvi_tools"),
}


def _directory(dataset: str, seed: int, epochs: int) -> Path:
    path = CACHE / f"{dataset}_seed{seed}_e{epochs}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _SharedDropout:
    """nn.Dropout.forward replaced (`install`): in training mode, the mask of the call's (step, call) draw."""

    step = -1
    call = 0
    shapes: list[tuple[int, ...]] = []  # the calls' shapes in the first step (both tools' must agree)

    @classmethod
    def start(cls) -> None:
        cls.step, cls.call = cls.step + 1, 0

    @classmethod
    def install(cls) -> None:
        """Replace nn.Dropout.forward; a new run's steps count from 0."""
        import torch

        cls.step, cls.call, cls.shapes = -1, 0, []

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            if cls.step == 0:
                cls.shapes.append(tuple(x.shape))
            draw = np.random.default_rng([DROPOUT_SEED, cls.step, cls.call]).random(tuple(x.shape))
            cls.call += 1
            keep = torch.from_numpy(draw >= self.p).to(x.dtype)
            return x * keep * (1.0 / (1.0 - self.p))

        torch.nn.Dropout.forward = forward


def _reference(dataset: str, n_genes: int) -> dict[str, Path]:
    """The reference h5ad of destvi_real's pair and its atlasvi store (built once)."""
    from benchmarks import destvi_fidelity as fidelity

    reference, spots = fidelity.real(dataset, HERE / ".cache" / "destvi", n_genes)
    stores = CACHE / f"{dataset}_{n_genes}_stores"
    if not (stores / "ref.zarr").exists():
        fidelity.build_stores(reference, spots, stores)
    return {"h5ad": reference, "store": stores / "ref.zarr"}


def _ulp(parameters: dict, seed: int) -> dict:
    """Every parameter x (1 + s 2^-23), s = +-1 per entry (a torch Generator seeded with `seed`)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in parameters.items():
        sign = torch.randint(0, 2, v.shape, generator=generator).to(v.dtype) * 2 - 1
        out[k] = v.detach() * (1 + sign * 2.0**-23)
    return out


# --------------------------------------------------------------------------------------------- atlasvi
def atlasvi_steps(paths: dict, seed: int, epochs: int, tool: str, directory: Path) -> None:
    """atlasvi's run `tool` (atlasvi, atlasvi_ulp or atlasvi_unfused), its record to `directory`. The plain run also
    saves its initial weights (init.pt, scvi-tools' names) and its minibatches' and held-out cells' names
    (batches.npz)."""
    import anndata as ad
    import torch

    from atlasvi.api.base import AtlasModel
    from atlasvi.api.condscvi import CondSCVI
    from atlasvi.data import LoaderConfig
    from atlasvi.models.scvi_tools import to_scvi_tools_name
    from atlasvi.train import TrainConfig, loop
    from benchmarks.destvi_fidelity import held_out_fraction, warmups
    from benchmarks.fidelity_data import save_init

    torch.set_num_threads(1)
    model = CondSCVI(paths["store"], device="cpu", seed=seed)
    module = model.module
    trained = {k: v for k, v in module.state_dict().items() if not k.endswith("_vprior")}
    if tool == "atlasvi":
        save_init(trained, "CondSCVI", directory / "init.pt")
    elif tool == "atlasvi_ulp":
        module.load_state_dict(_ulp(dict(module.named_parameters()), seed), strict=False)
    names = {k: to_scvi_tools_name("CondSCVI", k) for k in trained}
    dropout = _dropout_rates(module, str)
    _SharedDropout.install()
    _step_noise()
    record, validation_rows = _StepRecord(tool, module.n_latent, directory, SAMPLED), set()
    unpack, forward = module.unpack, module.forward
    reference = ad.read_h5ad(paths["h5ad"])
    cells = ad.read_zarr(paths["store"]).obs_names
    counts = reference[cells].X
    counts = torch.from_numpy(np.asarray(counts.todense() if hasattr(counts, "todense") else counts))

    def unpack_step(batch):
        inputs = unpack(batch)
        if not torch.is_grad_enabled():  # evaluation runs without autograd
            validation_rows.update(batch.rows.tolist())
            return inputs
        if not torch.equal(inputs.x.to(counts.dtype), counts[batch.rows]):
            raise RuntimeError(f"step {record.step}: atlasvi's minibatch counts are not the reference file's")
        state = module.state_dict()
        record.start({names[k]: state[k].detach().numpy() for k in names}, batch.rows.numpy())
        _SharedDropout.start()
        return inputs

    module.unpack, module.forward = unpack_step, record.recorded(forward)
    warmup = warmups((epochs, 1))[0]
    fraction = held_out_fraction(None, model.store.n_cells)
    config = TrainConfig(max_epochs=epochs, n_epochs_kl_warmup=warmup, seed=seed, validation_fraction=fraction)
    fused = loop._fused
    if tool == "atlasvi_unfused":
        loop._fused = lambda params: {}  # torch's default: the per-tensor step on CPU
    try:
        history = AtlasModel.fit(model, config, LoaderConfig(seed=seed))  # not CondSCVI.fit: no prototypes needed
    finally:
        loop._fused = fused
    del module.unpack, module.forward
    state = module.state_dict()
    record.finish({names[k]: state[k].detach().numpy() for k in names})
    batches, epoch_steps = record.save_fit(history, cells, dropout)
    np.save(directory / f"dropout_shapes_{tool}.npy", np.array(_SharedDropout.shapes))
    if tool == "atlasvi":
        validation = np.asarray(cells[sorted(validation_rows)], dtype=str)
        np.savez(directory / "batches.npz", batches=batches, epoch_steps=epoch_steps, validation=validation)


# --------------------------------------------------------------------------------------------- scvi-tools
def scvi_steps(paths: dict, seed: int, directory: Path) -> None:
    """scvi-tools' CondSCVI.train from atlasvi's initial weights on atlasvi's minibatches and held-out cell (run in
    the scvi-tools venv); its record saved as "scvi_tools"."""
    import logging

    import anndata as ad
    import scvi
    import torch

    from benchmarks.destvi_fidelity import warmups
    from benchmarks.fidelity_data import load_init

    torch.set_num_threads(1)
    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed
    reference = ad.read_h5ad(paths["h5ad"])
    scvi.model.CondSCVI.setup_anndata(reference, labels_key="cell_type")
    model = scvi.model.CondSCVI(reference, prior="normal")  # as destvi_fidelity's run builds it
    load_init(model.module, directory / "init.pt")
    recorded = np.load(directory / "batches.npz", allow_pickle=True)
    steps = [reference.obs_names.get_indexer(names) for names in recorded["batches"]]
    if any((s < 0).any() for s in steps):
        raise SystemExit("atlasvi's minibatches name cells that are not in the reference file")
    bounds = np.cumsum([0, *recorded["epoch_steps"]])
    per_epoch = [steps[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    x = reference.X
    counts = torch.from_numpy(np.asarray(x.todense() if hasattr(x, "todense") else x))
    record, dropout = _StepRecord("scvi_tools", model.module.n_latent, directory, SAMPLED), {}

    class StepPlan(model._training_plan_cls):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            dropout.update(_dropout_rates(self.module, lambda k: k.replace("fc_layers.Layer ", "layers.")))

        def training_step(self, batch, batch_idx):
            cells = steps[record.step]
            if not torch.equal(batch[scvi.REGISTRY_KEYS.X_KEY].to(counts.dtype), counts[cells]):
                raise RuntimeError(f"step {record.step}: scvi-tools' loader gave other counts than atlasvi's cells'")
            record.start({k: v.detach().numpy() for k, v in self.module.state_dict().items()}, cells)
            _SharedDropout.start()
            kl_weight = float(self.kl_weight)
            loss = super().training_step(batch, batch_idx)
            record.losses.append(float(loss.detach()))
            record.kl_weights.append(kl_weight)
            return loss

    model._data_splitter_cls, model._training_plan_cls = replay_splitter(model, per_epoch), StepPlan
    _SharedDropout.install()
    _step_noise()
    train_cells = np.sort(np.concatenate(per_epoch[0]))
    validation = reference.obs_names.get_indexer(recorded["validation"])
    model.train(
        max_epochs=len(per_epoch), accelerator="cpu", devices=1, enable_progress_bar=False, check_val_every_n_epoch=1,
        plan_kwargs={"n_epochs_kl_warmup": warmups((len(per_epoch), 1))[0]},
        datasplitter_kwargs={"external_indexing": [train_cells, np.sort(validation), np.array([], dtype=int)]},
    )  # fmt: skip
    record.finish({k: v.detach().numpy() for k, v in model.module.state_dict().items()})
    history = model.history
    np.save(directory / "dropout_shapes_scvi_tools.npy", np.array(_SharedDropout.shapes))
    record.save(
        dropout=json.dumps(dropout),
        validation_elbo=np.asarray(history["elbo_validation"], dtype=float).ravel(),
        validation_reconstruction=np.asarray(history["reconstruction_loss_validation"], dtype=float).ravel(),
    )


# --------------------------------------------------------------------------------------------- the end
def final_nll(paths: dict, directory: Path, tools: tuple[str, ...]) -> dict:
    """Each run's final weights (steps_TOOL_N.npz of its last step, scvi-tools' names) in atlasvi's module: the
    reconstruction NLL per cell of every reference cell (eval mode, z the posterior mean), the labels' codes and
    names, the cells' names."""
    import anndata as ad
    import torch

    from atlasvi.api.condscvi import CondSCVI
    from atlasvi.models.scvi_tools import to_scvi_tools_name

    torch.set_num_threads(1)
    model = CondSCVI(paths["store"], device="cpu", seed=0)
    module = model.module
    names = {to_scvi_tools_name("CondSCVI", k): k for k in module.state_dict() if not k.endswith("_vprior")}
    out = {"cells": np.asarray(ad.read_zarr(paths["store"]).obs_names, dtype=str)}
    for tool in tools:
        n_steps = len(np.load(directory / f"steps_{tool}.npz")["loss"])
        final = np.load(directory / f"steps_{tool}_{n_steps}.npz")
        state = {names[k]: torch.from_numpy(final[k]) for k in final.files if k in names}
        if set(state) != set(names.values()):
            raise SystemExit(f"{tool}: the final weights lack {sorted(set(names.values()) - set(state))}")
        module.load_state_dict(state, strict=False)
        module.eval()
        nll, labels, rows = [], [], []
        with torch.no_grad():
            for batch in model._batches(None, None, 1024):
                inputs = module.unpack(batch)
                qz = module.inference(inputs)["qz"]
                px = module.generative(qz.loc, inputs.x.sum(1, keepdim=True), inputs)["px"]
                nll.append((-px.log_prob(inputs.x).sum(-1)).numpy())
                labels.append(inputs.labels.view(-1).numpy())
                rows.append(batch.rows.numpy())
        order = np.argsort(np.concatenate(rows))
        out[tool] = np.concatenate(nll)[order]
        out["labels"] = np.concatenate(labels)[order]
    out["label_names"] = list(module.schema.categorical[module.labels_key])
    return out


def nll_summary(scores: dict, tools: tuple[str, ...]) -> dict:
    """Per run: the mean reconstruction NLL per cell; per run other than atlasvi and per type (all cells first):
    cells, atlasvi's mean NLL, the run's, the median per-cell difference run - atlasvi and the share of cells where
    it is above 0."""
    labels, base = scores["labels"], scores["atlasvi"]
    groups = {"all cells": np.ones(len(labels), dtype=bool)}
    groups |= {name: labels == code for code, name in enumerate(scores["label_names"]) if (labels == code).any()}
    out = {"mean": {tool: float(scores[tool].mean()) for tool in tools}, "per_type": {}}
    for tool in tools:
        if tool == "atlasvi":
            continue
        rows = []
        for name, mask in sorted(groups.items(), key=lambda kv: -kv[1].sum()):
            gap = scores[tool][mask] - base[mask]
            rows.append({"type": name, "cells": int(mask.sum()), "atlasvi": float(base[mask].mean()),
                         "other": float(scores[tool][mask].mean()), "median_gap": float(np.median(gap)),
                         "share_above": float((gap > 0).mean())})  # fmt: skip
        out["per_type"][tool] = rows
    return out


def report(dataset: str, n_genes: int, seed: int, epochs: int, reuse: bool) -> dict:
    """The runs (reuse: a run recorded in the cache is not run again) and their differences."""
    started, loads = time.perf_counter(), [list(os.getloadavg())]
    paths = _reference(dataset, n_genes)
    directory = _directory(dataset, seed, epochs)
    records, cpu = {}, {}
    for tool in RUNS:
        path = directory / f"steps_{tool}.npz"
        if not (reuse and path.exists()):
            before = time.process_time() + _children_cpu()
            if tool == "scvi_tools":
                env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
                command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--seed", str(seed)]
                command += ["--paths", json.dumps(paths, default=str), "--directory", str(directory)]
                subprocess.run(command, env=env, check=True)
            else:
                atlasvi_steps(paths, seed, epochs, tool, directory)
            cpu[tool] = time.process_time() + _children_cpu() - before
            loads.append(list(os.getloadavg()))
        records[tool] = np.load(path, allow_pickle=True)
    plain = records["atlasvi"]
    for tool in RUNS[1:]:
        theirs = records[tool]
        if tool != "scvi_tools" and not all(
            np.array_equal(a, b) for a, b in zip(plain["batches"], theirs["batches"], strict=True)
        ):
            raise SystemExit(f"{tool} trained on other minibatches than atlasvi")
    shapes = {tool: np.load(directory / f"dropout_shapes_{tool}.npy").tolist() for tool in RUNS}
    n_steps = len(plain["loss"])
    if any(len(r["loss"]) != n_steps for r in records.values()):
        counts = {t: len(r["loss"]) for t, r in records.items()}
        raise SystemExit(f"the runs took different numbers of steps: {counts}")
    kept = [s for s in SNAPSHOTS if s < n_steps] + [n_steps]
    differences = {label: _step_differences(records[a], records[b]) for label, (a, b) in PAIRS.items()}
    snapshots = {label: _snapshot_differences((a, b), kept, directory) for label, (a, b) in PAIRS.items()}
    scores = final_nll(paths, directory, RUNS)
    return {
        "meta": {
            "command": " ".join(["python", "benchmarks/condscvi_step_check.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
            "load_average_before_each_run_and_at_end": loads + [list(os.getloadavg())],
            "cpu_seconds": cpu,
            "seconds": time.perf_counter() - started,
            "dataset": dataset,
            "seed": seed,
            "epochs": epochs,
            "steps": n_steps,
            "epoch_steps": plain["epoch_steps"].tolist(),
            "held_out": [str(c) for c in np.load(directory / "batches.npz", allow_pickle=True)["validation"]],
        },
        "dropout_rates_in_normal_training": {
            tool: json.loads(str(records[tool]["dropout"])) for tool in ("atlasvi", "scvi_tools")
        },
        "dropout_calls_of_a_step": shapes,
        "losses": {tool: r["loss"].tolist() for tool, r in records.items()},
        "kl_weights": {tool: r["kl_weight"].tolist() for tool, r in records.items()},
        "validation": {
            tool: {k: r[k].tolist() for k in ("validation_elbo", "validation_reconstruction")}
            for tool, r in records.items()
        },
        "differences": differences,
        "snapshots": snapshots,
        "final_nll": nll_summary(scores, RUNS),
    }


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def markdown(report: dict) -> str:
    """The check's tables."""
    meta = report["meta"]
    n = meta["steps"]
    per_epoch = meta["epoch_steps"][0]
    shown = sorted({0, *(s for s in SNAPSHOTS if s < n), *range(0, n, 10 * per_epoch), n - 1})
    loads = "; ".join(" ".join(f"{x:.1f}" for x in load) for load in meta["load_average_before_each_run_and_at_end"])
    cpu = ", ".join(f"{t} {s:.0f}" for t, s in meta["cpu_seconds"].items())
    lines = [
        "# CondSCVI: a training run of atlasvi and scvi-tools 1.4.2 from the same weights, minibatches, dropout and "
        "noise",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}; load average (1, 5, 15 min) before each run and "
        f"at the end: {loads}; CPU seconds per run: {cpu or 'reused'}; {meta['seconds']:.0f} s in all.",
        "",
        f"{meta['dataset']} reference, seed {meta['seed']}: atlasvi's initial weights and minibatches, "
        f"{meta['epochs']} epochs of {per_epoch} minibatches ({n} steps), held-out cell "
        f"{', '.join(meta['held_out'])}; each tool's CondSCVI training defaults with destvi_fidelity's scaled KL "
        "warm-up. Dropout on, with the same mask per call in both tools, the same noise per step; the float-drift "
        "reference is atlasvi from its initial weights one float32 ulp off; atlasvi unfused takes torch's per-tensor "
        "Adam step (scvi-tools' on CPU) for atlasvi's fused one. See benchmarks/condscvi_step_check.py. "
        f"Weights: max |a - b| / max |a| per tensor on {SAMPLED} fixed entries of each (all of a smaller one), the "
        "largest over every tensor and the median, before the step (step = steps done). Loss: the step's loss, "
        "|a - b| / |a|.",
        "",
        *step_table(report, shown),
        "",
        "Every weight in full (max |a - b| / max |a|: the largest tensor; median over tensors):",
        "",
        *snapshot_table(report),
    ]
    kl = report["differences"]["atlasvi - scvi-tools"]["kl_weight_largest_diff"]
    signed = np.array(report["losses"]["atlasvi"]) - np.array(report["losses"]["scvi_tools"])
    lines += [
        "",
        f"Over the {n} steps: KL weights atlasvi - scvi-tools differ by at most {kl:.1e}; the step loss atlasvi - "
        f"scvi-tools is {signed.mean():+.5f} +- {signed.std(ddof=1):.5f} nats (largest |difference| "
        f"{np.abs(signed).max():.5f}; atlasvi's higher in {100 * (signed > 0).mean():.0f}% of the steps).",
        "",
        "At the end, one evaluator (atlasvi's module, eval mode, z the posterior mean) on every reference cell: mean "
        "reconstruction NLL per cell "
        + ", ".join(f"{t} {v:.4f}" for t, v in report["final_nll"]["mean"].items())
        + ". Per type (median per-cell difference run - atlasvi; share of cells where it is above 0):",
        "",
        "| run | type | cells | NLL atlasvi | NLL run | median difference | share above 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for tool, rows in report["final_nll"]["per_type"].items():
        for r in rows:
            lines.append(f"| {tool} | {r['type']} | {r['cells']} | {r['atlasvi']:.3f} | {r['other']:.3f} | "
                         f"{r['median_gap']:+.4f} | {r['share_above']:.2f} |")  # fmt: skip
    rates = report["dropout_rates_in_normal_training"]
    same = "the same layers with the same rates" if rates["atlasvi"] == rates["scvi_tools"] else "DIFFERENT"
    calls = report["dropout_calls_of_a_step"]
    same_calls = "the same" if calls["atlasvi"] == calls["scvi_tools"] else "DIFFERENT"
    lines += [
        "",
        f"Dropout: {same} (atlasvi {json.dumps(rates['atlasvi'], sort_keys=True)}; scvi-tools "
        f"{json.dumps(rates['scvi_tools'], sort_keys=True)}); the calls of a training step, in order, are "
        f"{same_calls} in both tools ({calls['atlasvi']}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pdac", choices=["lymph_node", "pdac"])
    parser.add_argument("--n-genes", type=int, default=500, help="the reference's top HVGs (destvi_real's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="CondSCVI epochs (KL warm-up scaled, destvi_fidelity)")
    parser.add_argument("--reuse", action="store_true", help="reuse the runs recorded in the cache")
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: scvi-tools' run")
    parser.add_argument("--paths", default=None, help="internal: the JSON of the prepared files")
    parser.add_argument("--directory", type=Path, default=None, help="internal: the run's cache folder")
    args = parser.parse_args()
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    if args.side == "scvi":
        scvi_steps(json.loads(args.paths), args.seed, args.directory)
        return
    result = report(args.dataset, args.n_genes, args.seed, args.epochs, args.reuse)
    name = f"condscvi_step_check_{args.dataset}"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "results" / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
