"""MultiVI's random streams in a real training run of each tool: minibatch order, latent noise, dropout masks and KL
weight per step, atlasvi's next to scvi-tools 1.4.2's, with each tool's own draws.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_streams.py --epochs 3

Run after benchmarks/multivi_fidelity.py has prepared its files (`.cache/multivi_fidelity/`). atlasvi's MULTIVI.fit
(the fidelity benchmark's settings: seed 0, batch 128, loader seed 0, KL warm-up 5 epochs) and scvi-tools'
MULTIVI.train (seed 0, its own initial weights, atlasvi's validation cells: `--same-split`'s external_indexing) train
for `--epochs` epochs; hooks only observe: each training step's cells and KL weight; every reparametrised Normal draw
under autograd as its standardised noise (z - loc) / scale, the step's last one being the joint posterior's z (the
loss's); every nn.Dropout call in training mode as the share of its nonzero inputs it kept (and, for the classifier's
first layer, whose two calls in a step, the fooling term's and its own loss's, read the same z, the share kept by
both). scvi-tools' half is this file with `--side scvi` in its venv. Reported per tool: steps per epoch and batch
sizes; whether each epoch is a permutation of the training cells; the rank correlation of a cell's position in
consecutive epochs; the per-batch counts of the three groups (RNA only, ATAC only, paired) against the
hypergeometric law of a uniform random batch; the joint noise's mean, s.d., excess kurtosis and the correlation of a
cell's noise between consecutive epochs; the dropout keep shares; the KL weight of every step. Output:
results/multivi_streams.{json,md}.
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

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "multivi_fidelity"
FOLDER = CACHE / "streams"
SEED, WARMUP, BATCH = 0, 5, 128


CLASSIFIER_FIRST = "adversary.classifier.0.layers.0"  # its two calls in a step read the same z


class _Observer:
    """The draws of one training run, step by step (hooks on Normal.rsample and nn.Dropout.forward)."""

    def __init__(self):
        self.cells: list[np.ndarray] = []
        self.kl_weights: list[float] = []
        self.joint: list[np.ndarray] = []  # per step: the last draw under autograd, standardised
        self.kept: dict[str, list[float]] = {}  # layer -> per call: the share of its nonzero inputs kept
        self.both_kept: list[float] = []  # CLASSIFIER_FIRST: the share kept by both calls of a step
        self._draws: list[np.ndarray] = []
        self._masks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def step(self, cells: np.ndarray) -> None:
        """A training step begins on `cells` (names)."""
        self._close()
        self.cells.append(np.asarray(cells, dtype=str))

    def _close(self) -> None:
        if self._draws:
            self.joint.append(self._draws[-1])
        masks = self._masks.get(CLASSIFIER_FIRST, [])
        if len(masks) == 2:
            (seen_a, kept_a), (seen_b, kept_b) = masks
            both = seen_a & seen_b
            self.both_kept.append(float((kept_a & kept_b)[both].mean()))
        self._draws, self._masks = [], {}

    def install(self, names: dict[int, str]) -> None:
        """Observe Normal.rsample and nn.Dropout.forward (layers named by names[id(layer)]) during steps."""
        import torch
        from torch.distributions import Normal

        rsample, dropout = Normal.rsample, torch.nn.Dropout.forward

        def observed_rsample(distribution, sample_shape=()):
            z = rsample(distribution, sample_shape)
            if torch.is_grad_enabled() and self.cells and distribution.loc.numel():
                eps = (z - distribution.loc) / distribution.scale
                self._draws.append(eps.detach().numpy().astype(np.float64))
            return z

        def observed_dropout(layer, x):
            out = dropout(layer, x)
            if layer.training and layer.p > 0 and self.cells:
                seen, kept = (x != 0).detach().numpy(), (out != 0).detach().numpy()
                name = names.get(id(layer), "unnamed")
                self.kept.setdefault(name, []).append(float(kept[seen].mean()))
                self._masks.setdefault(name, []).append((seen, kept))
            return out

        Normal.rsample, torch.nn.Dropout.forward = observed_rsample, observed_dropout

    def save(self, path: Path, **extra) -> None:
        """The record to `path` (.npz)."""
        self._close()
        cells = np.empty(len(self.cells), dtype=object)
        cells[:] = self.cells
        np.savez(
            path, cells=cells, kl_weights=np.array(self.kl_weights), joint=np.concatenate(self.joint),
            kept=json.dumps(self.kept), both_kept=np.array(self.both_kept), **extra,
        )  # fmt: skip


def atlasvi_side(epochs: int) -> None:
    """atlasvi's MULTIVI.fit as the fidelity benchmark runs it, observed; its validation cells' names to
    FOLDER/validation.npy (scvi-tools holds out the same)."""
    import anndata as ad
    import torch

    from atlasvi.api import MULTIVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig
    from benchmarks.multivi_step_check import _dropout_names

    torch.set_num_threads(1)
    model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=SEED)
    module, names = model.module, ad.read_zarr(CACHE / "train.zarr").obs_names
    observer, validation = _Observer(), set()
    observer.install(_dropout_names(module, str))
    unpack, forward = module.unpack, module.forward

    def unpack_step(batch):
        if torch.is_grad_enabled():
            observer.step(np.asarray(names[batch.rows.numpy()]))
        else:
            validation.update(batch.rows.tolist())
        return unpack(batch)

    def forward_step(inputs, kl_weight: float = 1.0):
        if torch.is_grad_enabled():
            observer.kl_weights.append(float(kl_weight))
        return forward(inputs, kl_weight)

    module.unpack, module.forward = unpack_step, forward_step
    model.fit(
        TrainConfig(seed=SEED, max_epochs=epochs, n_epochs_kl_warmup=WARMUP), LoaderConfig(batch_size=BATCH, seed=SEED)
    )
    FOLDER.mkdir(parents=True, exist_ok=True)
    np.save(FOLDER / "validation.npy", np.asarray(names[sorted(validation)], dtype=str))
    observer.save(FOLDER / "atlasvi.npz")


def scvi_side(epochs: int) -> None:
    """scvi-tools' MULTIVI.train (seed 0, atlasvi's validation cells), observed; also its default split's sizes."""
    from scvi import REGISTRY_KEYS
    from scvi.dataloaders._data_splitting import validate_data_split

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_step_check import _classifier_name, _dropout_names, _scvi_multivi
    from benchmarks.multivi_weights_check import atlasvi_name

    train, model = _scvi_multivi()
    observer = _Observer()

    def rename(k: str) -> str | None:
        return (atlasvi_name(k + ".x") or "")[:-2] or None

    class ObservedPlan(model._training_plan_cls):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            names = _dropout_names(self.module, rename, "module.")
            observer.install(names | _dropout_names(self.adversarial_classifier, _classifier_name))

        def training_step(self, batch, batch_idx):
            cells = batch[REGISTRY_KEYS.INDICES_KEY].view(-1).long().numpy()
            observer.step(np.asarray(train.obs_names[cells]))
            observer.kl_weights.append(float(self.kl_weight))
            return super().training_step(batch, batch_idx)

    model._training_plan_cls = ObservedPlan
    validation = np.sort(train.obs_names.get_indexer(np.load(FOLDER / "validation.npy")))
    cells = np.setdiff1d(np.arange(train.n_obs), validation)
    model.train(
        max_epochs=epochs, n_epochs_kl_warmup=WARMUP, accelerator="cpu", devices=1, enable_progress_bar=False,
        datasplitter_kwargs={"external_indexing": [cells, validation, np.array([], dtype=int)]},
    )  # fmt: skip
    default = validate_data_split(train.n_obs, 0.9, None, BATCH, False, True)
    observer.save(FOLDER / "scvi_tools.npz", default_split=np.array(default))


def _hypergeometric(n: int, population: int, successes: int) -> tuple[float, float]:
    """Mean and variance of the successes in a uniform random sample of n from the population."""
    share = successes / population
    return n * share, n * share * (1 - share) * (population - n) / (population - 1)


def stream_summary(record, groups: dict[str, str], epoch_steps: int, batch_size: int = BATCH) -> dict:
    """One run's streams (`record`: an _Observer's saved arrays) in figures; groups: cell name -> group; the group
    counts over the minibatches of `batch_size` cells."""
    from scipy import stats

    steps = list(record["cells"])
    epochs = [steps[i : i + epoch_steps] for i in range(0, len(steps), epoch_steps)]
    orders = [np.concatenate(e) for e in epochs]
    training = np.unique(np.concatenate(orders))  # every cell the run trained on
    position = [{c: i for i, c in enumerate(order)} for order in orders]  # a repeated cell: its last place
    both = [[c for c in training if c in a and c in b] for a, b in zip(position[:-1], position[1:], strict=False)]
    rank_corr = [
        float(stats.spearmanr([a[c] for c in common], [b[c] for c in common])[0])
        for a, b, common in zip(position[:-1], position[1:], both, strict=True)
    ]
    labels = sorted(set(groups.values()))
    full = [b for b in steps if len(b) == batch_size]
    counts = np.array([[sum(groups[c] == g for c in b) for g in labels] for b in full])
    expected = {g: _hypergeometric(batch_size, len(training), sum(groups[c] == g for c in training)) for g in labels}
    joint, cells = record["joint"], np.concatenate(steps)
    offsets = np.cumsum([0, *(len(o) for o in orders)])  # the joint noise's rows: the steps' cells in order
    first, second = (
        np.concatenate([joint[offsets[e + i] + position[e + i][c]] for e, common in enumerate(both) for c in common])
        for i in (0, 1)
    )
    kept = json.loads(str(record["kept"]))
    return {
        "steps_per_epoch": [len(e) for e in epochs],
        "batch_sizes_epoch_0": [len(b) for b in epochs[0]],
        "training_cells": len(training),
        "every_epoch_a_permutation_of_the_training_cells": all(np.array_equal(np.sort(o), training) for o in orders),
        "position_rank_correlation_consecutive_epochs": rank_corr,
        "group_counts_per_full_batch": {
            g: {
                "mean": float(counts[:, i].mean()),
                "variance": float(counts[:, i].var(ddof=1)),
                "hypergeometric_mean": expected[g][0],
                "hypergeometric_variance": expected[g][1],
                "variance_se": expected[g][1] * float(np.sqrt(2 / (len(counts) - 1))),  # normal approximation
            }
            for i, g in enumerate(labels)
        },
        "full_batches": len(full),
        "joint_noise": {
            "entries": int(joint.size),
            "mean": float(joint.mean()),
            "sd": float(joint.std()),
            "excess_kurtosis": float(stats.kurtosis(joint.ravel())),
            "rows_match_cells": bool(len(joint) == len(cells)),
            "same_cell_consecutive_epochs_correlation": float(np.corrcoef(first, second)[0, 1]),
        },
        "dropout_kept_share": {k: {"calls": len(v), "mean": float(np.mean(v))} for k, v in sorted(kept.items())},
        "classifier_first_layer_kept_by_both_calls": float(np.mean(record["both_kept"])),
        "kl_weights": record["kl_weights"].tolist(),
    }


def report(epochs: int) -> dict:
    """Both tools' runs (atlasvi here, scvi-tools in its venv) and their summaries."""
    import anndata as ad

    from benchmarks.multivi_fidelity import BATCH_KEY

    started = time.perf_counter()
    atlasvi_side(epochs)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([str(SCVI_PYTHON), __file__, "--side", "scvi", "--epochs", str(epochs)], env=env, check=True)
    obs = ad.read_h5ad(CACHE / "train.h5ad", backed="r").obs
    groups = dict(zip(obs.index.astype(str), obs[BATCH_KEY].astype(str), strict=True))
    records = {tool: np.load(FOLDER / f"{tool}.npz", allow_pickle=True) for tool in ("atlasvi", "scvi_tools")}
    steps = len(records["atlasvi"]["cells"]) // epochs
    summaries = {tool: stream_summary(r, groups, steps) for tool, r in records.items()}
    kl = [s["kl_weights"] for s in summaries.values()]
    return {
        "meta": {
            "command": " ".join(["python", "benchmarks/multivi_streams.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
            "load_average_at_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - started,
            "epochs": epochs,
            "n_epochs_kl_warmup": WARMUP,
            "scvi_tools_default_split_train_validation": records["scvi_tools"]["default_split"].tolist(),
        },
        "kl_weights_largest_difference": float(np.abs(np.subtract(*kl)).max()) if len(kl[0]) == len(kl[1]) else None,
        "tools": summaries,
    }


def _rows(s: dict) -> dict[str, str]:
    """One tool's summary as table rows (label -> text)."""
    sizes = s["batch_sizes_epoch_0"]
    rows = {
        "training cells": str(s["training_cells"]),
        "steps per epoch": ", ".join(map(str, s["steps_per_epoch"])),
        "batch sizes, epoch 0": f"{sizes[0]} x {len(sizes) - 1}, last {sizes[-1]}",
        "every epoch a permutation of the training cells": str(s["every_epoch_a_permutation_of_the_training_cells"]),
        "cell position, rank correlation between consecutive epochs (mean, largest |r|)": (
            f"{np.mean(s['position_rank_correlation_consecutive_epochs']):+.4f}, "
            f"{np.abs(s['position_rank_correlation_consecutive_epochs']).max():.3f}"
        ),
    }
    for g, c in s["group_counts_per_full_batch"].items():
        rows[f"{g} cells per full batch: mean / variance (hypergeometric, +- s.e. of the variance)"] = (
            f"{c['mean']:.2f} / {c['variance']:.2f} ({c['hypergeometric_mean']:.2f} / "
            f"{c['hypergeometric_variance']:.2f} +- {c['variance_se']:.2f})"
        )
    noise = s["joint_noise"]
    rows["joint z noise: entries, mean, s.d., excess kurtosis"] = (
        f"{noise['entries']}, {noise['mean']:+.4f}, {noise['sd']:.4f}, {noise['excess_kurtosis']:+.3f}"
    )
    rows["joint z noise: a cell's correlation between consecutive epochs"] = (
        f"{noise['same_cell_consecutive_epochs_correlation']:+.4f}"
    )
    for layer, kept in s["dropout_kept_share"].items():
        rows[f"dropout kept share: {layer} (calls)"] = f"{kept['mean']:.4f} ({kept['calls']})"
    rows["classifier's first layer: kept by both calls of a step (independent: 0.81)"] = (
        f"{s['classifier_first_layer_kept_by_both_calls']:.4f}"
    )
    return rows


def markdown(result: dict) -> str:
    """The report's tables."""
    meta, tools = result["meta"], result["tools"]
    rows = {tool: _rows(s) for tool, s in tools.items()}
    labels = list(dict.fromkeys(label for r in rows.values() for label in r))
    lines = [
        "# MultiVI: each tool's random streams in real training (atlasvi and scvi-tools 1.4.2)",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])}; {meta['seconds']:.0f} s in all.",
        "",
        f"{meta['epochs']} epochs per tool, seed 0, batch 128, KL warm-up {meta['n_epochs_kl_warmup']} epochs, each "
        "tool's own draws, both on the same training cells (scvi-tools holds out atlasvi's validation cells); see "
        "benchmarks/multivi_streams.py. own: a layer atlasvi does not build (scvi-tools' protein modules).",
        "",
        "| | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    lines += [f"| {label} | " + " | ".join(r.get(label, "-") for r in rows.values()) + " |" for label in labels]
    train, val = meta["scvi_tools_default_split_train_validation"]
    lines += [
        "",
        f"KL weight per step: the tools' differ by at most {result['kl_weights_largest_difference']:.1e}. scvi-tools' "
        f"own default split (train_size 0.9, as without --same-split) would train on {train} cells and validate on "
        f"{val}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: scvi-tools' run")
    args = parser.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the streams are compared between epochs)")
    if args.side == "scvi":
        scvi_side(args.epochs)
        return
    result = report(args.epochs)
    (HERE / "results" / "multivi_streams.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "results" / "multivi_streams.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
