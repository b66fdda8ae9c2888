"""PeakVI many-step check: atlasvi's and scvi-tools 1.4.2's training loops from the same weights, on the same
minibatches, with the same noise, over a whole default training run.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/peakvi_step_check.py --seed 0

Granja 2019 (the files of benchmarks/peakvi_fidelity.py: 540 training cells, atlasvi's training store of the seed,
its 54 validation cells, the 60 held-out cells). Runs, one after the other (one torch thread each):

- atlasvi: PEAKVI(store, seed).fit with PeakVI's defaults (AdamW lr 1e-4, weight decay 1e-3, eps 1e-8, KL warm-up
  50 epochs, up to 500 epochs, early stopping on the validation reconstruction, patience 50; batch 128, loader seed);
  its initial weights are saved for scvi-tools, its minibatches and validation cells recorded;
- scvi-tools: PEAKVI.train with its defaults (TrainingPlan, AdamW, warm-up and early stopping by Lightning) from
  atlasvi's initial weights, its training loader replaying atlasvi's minibatches in order (each step's counts
  checked against the recorded cells'), atlasvi's validation cells (external_indexing), max_epochs = atlasvi's
  epochs;
- atlasvi reordered (the float-drift reference): atlasvi's run with each minibatch's cells, and their noise rows, in
  another order (default_rng([13, k]).permutation in step k): the same run in exact arithmetic, rounded otherwise;
- atlasvi unscaled: atlasvi's run with the optimizer on the per-cell loss (objective_scale 1, as before 8b688d0):
  AdamW's eps 1e-8 then weighs n^2 = 16,384 x more than in scvi-tools;
- atlasvi unfused: atlasvi's run with torch's per-tensor AdamW (what scvi-tools' plan gets on CPU) in place of the
  fused one atlasvi's loop builds: the same update, rounded as scvi-tools rounds it.

In every run dropout is off (p 0; the tools' rates in normal training are compared) and every reparametrised draw
is the step's (benchmarks/multivi_step_check.py's: loc + scale x eps_k in training step k; the mean in
validation).
Recorded per step: the per-cell loss (scvi-tools' summed loss / n^2), the KL weight, SAMPLED fixed entries of every
weight (all of a smaller tensor), under scvi-tools' names; every weight after the steps of SNAPSHOTS and the last;
per epoch the validation -ELBO and reconstruction (KL weight 1, the mean as z); at the end the held-out BCE (nats per
cell at the posterior mean, peakvi_fidelity's) and the label kNN accuracy of the latent. The tools train alike if
their difference stays at the reference's size. Writes results/peakvi_step_check_seedS.{json,md}.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/peakvi_step_check.py --same-stream 0 1 2 --variants unscaled ulp

atlasvi's normal training (dropout on, 500 epochs) of each seed, whose minibatches, dropout masks and draws come from
the seed alone, as VARIANTS say: as is, unscaled (the optimizer on the per-cell loss, as before 8b688d0), or every
initial weight one float32 ulp off; the held-out BCE and kNN at the end next to atlasvi's committed runs of the seed
before and after 8b688d0. Writes results/peakvi_same_stream.{json,md}, keeping the runs of other seeds and variants
that are there.
"""

import argparse
import dataclasses
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
    _no_dropout,
    _reordered,
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
CACHE = HERE / ".cache" / "peakvi_step_check"
SAMPLED = 256  # entries of each tensor recorded before every step (2,000 steps)
RUNS = ("atlasvi", "scvi_tools", "atlasvi_reordered", "atlasvi_unscaled", "atlasvi_unfused")
PAIRS = {
    "atlasvi - scvi-tools": ("atlasvi", "scvi_tools"),
    "atlasvi - atlasvi reordered (float-drift reference)": ("atlasvi", "atlasvi_reordered"),
    "atlasvi - atlasvi unscaled (eps as before 8b688d0)": ("atlasvi", "atlasvi_unscaled"),
    "atlasvi unfused - scvi-tools": ("atlasvi_unfused", "scvi_tools"),
}


def _directory(seed: int) -> Path:
    path = CACHE / f"seed{seed}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------- atlasvi
def atlasvi_steps(paths: dict, seed: int, max_epochs: int | None, tool: str) -> None:
    """atlasvi's run `tool` (atlasvi, atlasvi_reordered, atlasvi_unscaled, atlasvi_unfused; see the module
    docstring), its record
    to the seed's directory. The plain run also saves its initial weights (init.pt, scvi-tools' names) and its
    minibatches' and validation cells' names (batches.npz)."""
    import anndata as ad
    import torch

    from atlasvi.api import PEAKVI
    from atlasvi.data import LoaderConfig
    from atlasvi.models.scvi_tools import to_scvi_tools_name
    from atlasvi.train import TrainConfig, loop
    from benchmarks.fidelity_data import save_init
    from benchmarks.peakvi_fidelity import atlasvi_knn_accuracy, heldout_bce

    torch.set_num_threads(1)
    directory = _directory(seed)
    store = paths[f"train_store_{seed}"]
    model = PEAKVI(store, device="cpu", seed=seed)
    module = model.module
    if tool == "atlasvi":
        save_init(module.state_dict(), "PEAKVI", directory / "init.pt")
    names = {k: to_scvi_tools_name("PEAKVI", k) for k in module.state_dict()}
    dropout = _dropout_rates(module, str)
    _no_dropout(module)
    _step_noise()
    record, validation_rows = _StepRecord(tool, module.n_latent, directory, SAMPLED), set()
    unpack, forward = module.unpack, module.forward

    def unpack_step(batch):
        inputs = unpack(batch)
        if not torch.is_grad_enabled():  # evaluation runs without autograd
            validation_rows.update(batch.rows.tolist())
            return inputs
        record.start({names[k]: v.detach().numpy() for k, v in module.state_dict().items()}, batch.rows.numpy())
        if tool == "atlasvi_reordered":
            order = torch.from_numpy(np.random.default_rng([13, record.step - 1]).permutation(len(batch)))
            record.eps = record.eps[order]
            inputs = _reordered(inputs, order)
        return inputs

    recorded = record.recorded(forward)

    def unscaled(inputs, kl_weight: float = 1.0):
        return dataclasses.replace(recorded(inputs, kl_weight), objective_scale=1.0)

    module.unpack, module.forward = unpack_step, unscaled if tool == "atlasvi_unscaled" else recorded
    fields = {} if max_epochs is None else {"max_epochs": max_epochs}
    fused = loop._fused
    if tool == "atlasvi_unfused":
        loop._fused = lambda params: {}  # torch's default: the per-tensor step on CPU
    try:
        history = model.fit(TrainConfig(seed=seed, **fields), LoaderConfig(batch_size=128, seed=seed))
    finally:
        loop._fused = fused
    del module.unpack, module.forward  # the class's again: scoring reads other cells
    record.finish({names[k]: v.detach().numpy() for k, v in module.state_dict().items()})
    cells = ad.read_zarr(store).obs_names
    batches, epoch_steps = record.save_fit(history, cells, dropout)
    stores, h5ads = [store, paths["heldout_store"]], [paths["train"], paths["heldout"]]
    _save_end(directory, tool, heldout_bce(model, paths["heldout_store"]), atlasvi_knn_accuracy(model, stores, h5ads))
    if tool == "atlasvi":
        validation = np.asarray(cells[sorted(validation_rows)], dtype=str)
        np.savez(directory / "batches.npz", batches=batches, epoch_steps=epoch_steps, validation=validation)


# --------------------------------------------------------------------------------------------- scvi-tools
def scvi_steps(paths: dict, seed: int) -> None:
    """scvi-tools' PEAKVI.train from atlasvi's initial weights on atlasvi's minibatches and validation cells (run
    in the scvi-tools venv); its record saved as "scvi_tools"."""
    import logging

    import anndata as ad
    import scvi
    import torch

    from benchmarks.fidelity_data import load_init
    from benchmarks.peakvi_fidelity import BATCH_KEY, scvi_heldout_bce, scvi_knn_accuracy

    torch.set_num_threads(1)
    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed
    directory = _directory(seed)
    train, held = ad.read_h5ad(paths["train"]), ad.read_h5ad(paths["heldout"])
    scvi.model.PEAKVI.setup_anndata(train, batch_key=BATCH_KEY)
    model = scvi.model.PEAKVI(train)
    load_init(model.module, directory / "init.pt")
    recorded = np.load(directory / "batches.npz", allow_pickle=True)
    steps = [train.obs_names.get_indexer(names) for names in recorded["batches"]]
    if any((s < 0).any() for s in steps):
        raise SystemExit("atlasvi's minibatches name cells that are not in the training file")
    bounds = np.cumsum([0, *recorded["epoch_steps"]])
    per_epoch = [steps[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    counts = torch.from_numpy(np.asarray(train.X.todense() if hasattr(train.X, "todense") else train.X))
    record, dropout = _StepRecord("scvi_tools", model.module.n_latent, directory, SAMPLED), {}

    class StepPlan(model._training_plan_cls):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            dropout.update(_dropout_rates(self.module, _atlasvi_block))
            _no_dropout(self.module)

        def training_step(self, batch, batch_idx):
            cells = steps[record.step]
            x = batch[scvi.REGISTRY_KEYS.X_KEY]
            if not torch.equal(x.to(counts.dtype), counts[cells]):
                raise RuntimeError(f"step {record.step}: scvi-tools' loader gave other counts than atlasvi's cells'")
            state = {k: v.detach().numpy() for k, v in self.module.state_dict().items()}
            record.start(state, cells)
            kl_weight = float(self.kl_weight)
            loss = super().training_step(batch, batch_idx)  # n x summed reconstruction + kl_weight x summed KL
            record.losses.append(float(loss.detach()) / len(cells) ** 2)
            record.kl_weights.append(kl_weight)
            return loss

    model._data_splitter_cls, model._training_plan_cls = replay_splitter(model, per_epoch), StepPlan
    _step_noise()
    train_cells = np.sort(np.concatenate(per_epoch[0]))
    validation = train.obs_names.get_indexer(recorded["validation"])
    model.train(
        max_epochs=len(per_epoch), accelerator="cpu", devices=1, enable_progress_bar=False,
        datasplitter_kwargs={"external_indexing": [train_cells, np.sort(validation), np.array([], dtype=int)]},
    )  # fmt: skip
    record.finish({k: v.detach().numpy() for k, v in model.module.state_dict().items()})
    history = model.history
    held = model._validate_anndata(held)
    record.save(
        dropout=json.dumps(dropout),
        validation_elbo=np.asarray(history["elbo_validation"], dtype=float).ravel(),
        validation_reconstruction=np.asarray(history["reconstruction_loss_validation"], dtype=float).ravel(),
    )
    _save_end(directory, "scvi_tools", scvi_heldout_bce(model, held), scvi_knn_accuracy(model, train, held))


def _save_end(directory: Path, tool: str, bce: float, knn: float) -> None:
    """A run's figures at the end (end_TOOL.json): held-out BCE and kNN accuracy."""
    (directory / f"end_{tool}.json").write_text(json.dumps({"heldout_bce": bce, "knn_accuracy": knn}))


def _atlasvi_block(name: str) -> str:
    """atlasvi's name of a scvi-tools PEAKVAE block (its layers' prefix), for the dropout rates."""
    return name.replace("fc_layers.Layer ", "layers.")


# --------------------------------------------------------------------------------------------- same stream
VARIANTS = {
    "as_is": "atlasvi's PEAKVI defaults",
    "unscaled": "the optimizer on the per-cell loss (objective_scale 1, AdamW's eps as before 8b688d0)",
    "ulp": "every initial weight x (1 + s 2^-23), s = +-1 drawn per entry (torch Generator seeded with the seed)",
}


def same_stream(paths: dict, seed: int, variant: str) -> dict:
    """atlasvi's normal training of the seed (dropout on, its own minibatches and draws: the stream of the seed,
    whatever the weights) as `variant` of VARIANTS; the held-out BCE and kNN accuracy at the end."""
    import torch

    from atlasvi.api import PEAKVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig
    from benchmarks.peakvi_fidelity import atlasvi_knn_accuracy, heldout_bce

    torch.set_num_threads(1)
    store = paths[f"train_store_{seed}"]
    model = PEAKVI(store, device="cpu", seed=seed)
    module = model.module
    if variant == "ulp":
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in module.parameters():
                sign = torch.randint(0, 2, weight.shape, generator=generator) * 2 - 1
                weight.mul_(1 + sign * 2.0**-23)
    forward = module.forward
    if variant == "unscaled":
        module.forward = lambda inputs, kl_weight=1.0: dataclasses.replace(
            forward(inputs, kl_weight), objective_scale=1.0
        )
    load, started = list(os.getloadavg()), time.perf_counter()
    history = model.fit(TrainConfig(seed=seed), LoaderConfig(batch_size=128, seed=seed))
    seconds = time.perf_counter() - started
    if variant == "unscaled":
        del module.forward  # the class's again
    stores, h5ads = [store, paths["heldout_store"]], [paths["train"], paths["heldout"]]
    return {
        "seed": seed,
        "variant": variant,
        "heldout_bce_mean_z": heldout_bce(model, paths["heldout_store"]),
        "knn_accuracy": atlasvi_knn_accuracy(model, stores, h5ads),
        "epochs": len(history),
        "last_validation_reconstruction": history[-1].validation_reconstruction,
        "train_seconds": seconds,
        "load_average_at_start": load,
    }


def committed_atlasvi(seed: int) -> dict[str, float]:
    """atlasvi's held-out BCE of the seed in the committed paired runs: before 8b688d0 (results/peakvi_fidelity.json)
    and after (results/peakvi_paired.json, peakvi_paired_seeds34.json), where there is one."""
    out = {}
    for label, names in (("before", ["peakvi_fidelity"]), ("after", ["peakvi_paired", "peakvi_paired_seeds34"])):
        for name in names:
            rows = json.loads((HERE / "results" / f"{name}.json").read_text())["rows"]
            for row in rows:
                if row["tool"] == "atlasvi" and row["seed"] == seed:
                    out[label] = row["heldout_bce_mean_z"]
    return out


def same_stream_markdown(rows: list[dict], commands: list[str]) -> str:
    """The same-stream runs (kept by seed and variant over the commands) next to the committed ones."""
    lines = [
        "# PeakVI: atlasvi's own training stream, with and without the AdamW-scale fix (8b688d0), and 1 ulp off",
        "",
        "Commands: "
        + "; ".join(f"`{c}`" for c in commands)
        + f". Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch "
        "thread. atlasvi's normal training on Granja 2019 (PeakVI defaults, dropout on, 500 epochs): the minibatch "
        "order, dropout masks and latent draws come from the seed alone, so every run of a seed sees the same stream. "
        "Variants: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()) + ". Committed: atlasvi's rows of "
        "results/peakvi_fidelity.json (before the fix) and peakvi_paired{,_seeds34}.json (after).",
        "",
        "| seed | variant | held-out BCE | - committed after the fix | kNN | epochs | train s | load at start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"]))):
        committed = committed_atlasvi(r["seed"])
        gap = f"{r['heldout_bce_mean_z'] - committed['after']:+.3f}" if "after" in committed else "-"
        lines.append(
            f"| {r['seed']} | {r['variant']} | {r['heldout_bce_mean_z']:.3f} | {gap} | {r['knn_accuracy']:.3f} | "
            f"{r['epochs']} | {r['train_seconds']:.0f} | {r['load_average_at_start'][0]:.1f} |"
        )
    lines += ["", "Committed held-out BCE of atlasvi (before / after the fix):", ""]
    for seed in sorted({r["seed"] for r in rows}):
        committed = committed_atlasvi(seed)
        lines.append(
            f"- seed {seed}: " + " / ".join(f"{committed.get(k, float('nan')):.3f}" for k in ("before", "after"))
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- report
def report(seed: int, max_epochs: int | None, reuse: bool) -> dict:
    """The runs (see the module docstring; reuse: a run recorded in the cache is not run again) and their
    differences, step by step and at the end."""
    from benchmarks.peakvi_fidelity import prepare

    started, loads = time.perf_counter(), [list(os.getloadavg())]
    paths = prepare([seed])
    directory = _directory(seed)
    records = {}
    for tool in RUNS:
        path = directory / f"steps_{tool}.npz"
        if not (reuse and path.exists()):
            if tool == "scvi_tools":
                env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
                command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--seed", str(seed)]
                subprocess.run([*command, "--paths", json.dumps(paths, default=str)], env=env, check=True)
            else:
                atlasvi_steps(paths, seed, max_epochs, tool)
            loads.append(list(os.getloadavg()))
        records[tool] = np.load(path, allow_pickle=True)
    plain = records["atlasvi"]
    for tool in ("atlasvi_reordered", "atlasvi_unscaled"):
        theirs = records[tool]["batches"]
        same = len(plain["batches"]) == len(theirs) and all(
            np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(plain["batches"], theirs, strict=True)
        )
        if not same:
            raise SystemExit(f"{tool} trained on other minibatches than atlasvi")
    n_steps = min(len(r["loss"]) for r in records.values())
    kept = [s for s in SNAPSHOTS if s < n_steps] + [len(plain["loss"])]
    differences, snapshots = {}, {}
    for label, (a, b) in PAIRS.items():
        differences[label] = _step_differences(_first(records[a], n_steps), _first(records[b], n_steps))
        if len(records[a]["loss"]) == len(records[b]["loss"]):
            snapshots[label] = _snapshot_differences((a, b), kept, directory)
    return {
        "meta": {
            "command": " ".join(["python", "benchmarks/peakvi_step_check.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
            "load_average_before_each_run_and_at_end": loads + [list(os.getloadavg())],
            "seconds": time.perf_counter() - started,
            "seed": seed,
            "epoch_steps": plain["epoch_steps"].tolist(),
        },
        "steps": {tool: len(r["loss"]) for tool, r in records.items()},
        "epochs": {tool: len(r["validation_elbo"]) for tool, r in records.items()},
        "dropout_rates_in_normal_training": {
            tool: json.loads(str(records[tool]["dropout"])) for tool in ("atlasvi", "scvi_tools")
        },
        "losses": {tool: r["loss"].tolist() for tool, r in records.items()},
        "kl_weights": {tool: r["kl_weight"].tolist() for tool, r in records.items()},
        "validation": {
            tool: {k: r[k].tolist() for k in ("validation_elbo", "validation_reconstruction")}
            for tool, r in records.items()
        },
        "end": {tool: json.loads((directory / f"end_{tool}.json").read_text()) for tool in records},
        "differences": differences,
        "snapshots": snapshots,
    }


class _Npz(dict):
    files = property(lambda self: list(self))


def _first(record, n_steps: int) -> _Npz:
    """A record's samples, losses and KL weights of its first n_steps steps (the samples before step n_steps)."""
    out = _Npz({k: record[k][: n_steps + 1] for k in record.files if k.startswith("sample|")})
    return _Npz(out | {k: record[k][:n_steps] for k in ("loss", "kl_weight")})


def markdown(report: dict) -> str:
    """The check's tables."""
    meta, steps = report["meta"], report["steps"]
    n = min(steps.values())
    per_epoch = meta["epoch_steps"][0]
    shown = sorted({0, *(s for s in SNAPSHOTS if s < n), *range(0, n, 50 * per_epoch), n - 1})
    loads = "; ".join(" ".join(f"{x:.1f}" for x in load) for load in meta["load_average_before_each_run_and_at_end"])
    lines = [
        "# PeakVI: a whole training run of atlasvi and scvi-tools 1.4.2 from the same weights, minibatches and noise",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}; load average (1, 5, 15 min) before each run and "
        f"at the end: {loads}; {meta['seconds']:.0f} s in all.",
        "",
        f"Granja 2019, seed {meta['seed']}: atlasvi's initial weights, training store and validation cells; each "
        f"tool's PEAKVI defaults; epochs of {per_epoch} minibatches. Dropout off, the same noise per step, scvi-tools "
        "replays atlasvi's minibatches; reference runs of atlasvi: each minibatch reordered (float drift), and the "
        "optimizer on the per-cell loss (eps as before 8b688d0). See benchmarks/peakvi_step_check.py. Weights: "
        f"max |a - b| / max |a| per tensor on {SAMPLED} fixed entries of each (all of a smaller one), the largest over "
        "every tensor and the median, before the step (step = steps done). Loss: the step's per-cell loss, |a - b| / "
        "|a|.",
        "",
        "Steps and epochs run: " + ", ".join(f"{t} {steps[t]} / {report['epochs'][t]}" for t in steps) + ".",
        "",
        *step_table(report, shown),
        "",
        "Every weight in full (max |a - b| / max |a|: the largest tensor; median over tensors):",
        "",
        *snapshot_table(report),
    ]
    kl = report["differences"]["atlasvi - scvi-tools"]["kl_weight_largest_diff"]
    validation = report["validation"]
    lines += [
        "",
        f"KL weights atlasvi - scvi-tools: largest |difference| {kl:.1e} over {n} steps.",
        "",
        "Validation per cell (KL weight 1, the mean as z): -ELBO / reconstruction, every 25 epochs and the last:",
        "",
        "| epoch | " + " | ".join(validation) + " |",
        "|---|" + "---|" * len(validation),
    ]
    epochs = min(report["epochs"].values())
    for epoch in sorted({*range(0, epochs, 25), epochs - 1}):
        cells = [
            f"{v['validation_elbo'][epoch]:.3f} / {v['validation_reconstruction'][epoch]:.3f}"
            for v in validation.values()
        ]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    end = report["end"]
    lines += [
        "",
        "At the end: held-out BCE (nats per cell, posterior mean, peakvi_fidelity's) and label kNN accuracy:",
        "",
        "| run | held-out BCE | kNN | held-out BCE - atlasvi's |",
        "|---|---|---|---|",
    ]
    for tool, e in end.items():
        gap = e["heldout_bce"] - end["atlasvi"]["heldout_bce"]
        lines.append(f"| {tool} | {e['heldout_bce']:.3f} | {e['knn_accuracy']:.3f} | {gap:+.3f} |")
    rates = report["dropout_rates_in_normal_training"]
    same = "the same layers with the same rates" if rates["atlasvi"] == rates["scvi_tools"] else "DIFFERENT"
    shown = {tool: json.dumps(r, sort_keys=True) for tool, r in rates.items()}
    lines += [
        "",
        f"Dropout (off in this check) in the tools' normal training: {same} (atlasvi {shown['atlasvi']}; scvi-tools "
        f"{shown['scvi_tools']}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=None, help="atlasvi's (scvi-tools replays as many)")
    parser.add_argument("--reuse", action="store_true", help="reuse the runs recorded in the cache")
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: scvi-tools' run")
    parser.add_argument("--paths", default=None, help="internal: the JSON of the prepared files")
    parser.add_argument("--same-stream", type=int, nargs="+", default=None, metavar="SEED", help="atlasvi's own stream")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["unscaled", "ulp"])
    args = parser.parse_args()
    if args.side == "scvi":
        scvi_steps(json.loads(args.paths), args.seed)
        return
    if args.same_stream is not None:
        from benchmarks.peakvi_fidelity import prepare

        paths, out = prepare(args.same_stream), HERE / "results" / "peakvi_same_stream.json"
        command = " ".join(["python", "benchmarks/peakvi_step_check.py", *sys.argv[1:]])
        kept = json.loads(out.read_text()) if out.exists() else {"commands": [], "rows": []}
        commands, rows = [*kept["commands"], command], kept["rows"]
        for seed in args.same_stream:
            for variant in args.variants:  # a run replaces the kept one of its seed and variant
                rows = [r for r in rows if (r["seed"], r["variant"]) != (seed, variant)]
                rows.append(same_stream(paths, seed, variant))
                print(json.dumps(rows[-1]), flush=True)
                out.write_text(json.dumps({"commands": commands, "rows": rows}, indent=1) + "\n")
                out.with_suffix(".md").write_text(same_stream_markdown(rows, commands))
        print(same_stream_markdown(rows, commands))
        return
    result = report(args.seed, args.max_epochs, args.reuse)
    name = f"peakvi_step_check_seed{args.seed}"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "results" / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
