"""LDVAE: many training steps of atlasvi and scvi-tools 1.4.2 from the same weights, minibatches and noise (issue 18).

    python benchmarks/ldvae_step_check.py --init 3 --stream 3 --epochs 30

benchmarks/multivi_step_check.py's `--steps` check for LDVAE on Kang with no batch covariate (the stores of
benchmarks/ldvae_fidelity.py's `none` setup). atlasvi trains through its own loop (`atlasvi.train.fit`, the loader
and fit seeded by `--stream`, KL warm-up by epoch) from its initial weights of seed `--init` (those of
ldvae_fidelity.py's seed); scvi-tools' LinearSCVI trains through its own (`train()`, its TrainingPlan: Adam, KL
warm-up) from the same weights, on atlasvi's minibatches replayed in order by its training loader
(multivi_step_check's `replay_splitter`), with the held-out cells as its validation cells. In both: dropout off (p 0,
training mode otherwise: batch norm on batch statistics, running statistics updated), and in training step k every
reparametrised Normal draw is loc + scale x eps_k: the latent z's eps from default_rng([7, k]) (multivi_step_check's
`_step_noise`), the latent library's from default_rng([7, k, 1]); outside training (validation) the mean. Recorded
per step: the loss, the KL weight and 2,048 fixed entries of every weight and buffer (all of a smaller tensor); every
tensor in full after the steps of multivi_step_check.SNAPSHOTS and the last; per epoch the held-out -ELBO and
reconstruction (KL weight 1, the posterior means). The float-drift reference is atlasvi again from its initial
weights perturbed by one float32 ulp (x (1 +- 2^-23), a seeded sign per entry): how far a rounding-sized difference
grows over the same steps. The loops are the same if the tools stay as close as the reference does.
`--nb-formula scvi-tools`: atlasvi's runs with scvi-tools' NB log-likelihood patched in (the one step of
benchmarks/ldvae_peakvi_step.py differs only there). Writes results/ldvae_step_check[_scvi_nb].{json,md}.
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

from benchmarks.ldvae_fidelity import HERE, SCVI_PYTHON, WORK, atlasvi_names, stores
from benchmarks.ldvae_peakvi_step import patched, scvi_nb_log_likelihood
from benchmarks.multivi_step_check import (
    NOISE_SEED,
    SNAPSHOTS,
    _dropout_rates,
    _no_dropout,
    _snapshot_differences,
    _step_differences,
    _step_noise,
    _StepRecord,
    replay_splitter,
    snapshot_table,
    step_table,
    validation_table,
)

FOLDER = WORK / "step_check"
UNUSED = ("decoder.px_dropout_decoder.",)  # scvi-tools' zero-inflation layer, unused for NB
TOOLS = ("atlasvi", "scvi_tools", "atlasvi_ulp")


class _LDVAERecord(_StepRecord):
    """multivi_step_check's record with a second noise per step, for the latent library (cells x 1)."""

    def __init__(self, tool: str, n_latent: int):
        super().__init__(tool, n_latent, FOLDER)
        self.eps_library = None

    def start(self, state: dict[str, np.ndarray], rows: np.ndarray) -> None:
        import torch

        rng = np.random.default_rng([NOISE_SEED, self.step, 1])
        self.eps_library = torch.from_numpy(rng.standard_normal((len(rows), 1)).astype(np.float32))
        super().start(state, rows)


def _ldvae_step_noise() -> None:
    """multivi_step_check's `_step_noise`, with a (cells x 1) draw under autograd taking the record's library eps."""
    import torch
    from torch.distributions import Normal

    _step_noise()
    base = Normal.rsample

    def rsample(self, sample_shape=()):  # Normal.rsample's signature
        record = _StepRecord.current
        library = getattr(record, "eps_library", None)
        if torch.is_grad_enabled() and library is not None and self.loc.shape == library.shape:
            return self.loc + self.scale * library
        return base(self, sample_shape)

    Normal.rsample = rsample


def _perturbed(state: dict, seed: int) -> dict:
    """Every floating weight x (1 + s 2^-23), s = +-1 per entry from default_rng(seed): one float32 ulp."""
    import torch

    rng = np.random.default_rng(seed)
    out = {}
    for name, value in state.items():
        if value.is_floating_point():
            sign = torch.from_numpy(rng.choice([-1.0, 1.0], size=tuple(value.shape)).astype(np.float32))
            value = value * (1 + sign * 2.0**-23)
        out[name] = value
    return out


def _state(module) -> dict[str, np.ndarray]:
    """Every weight and buffer under atlasvi's names (numpy), scvi-tools' unused zero-inflation layer left out."""
    return {k: v.detach().numpy() for k, v in atlasvi_names(module.state_dict()).items()}


def atlasvi_steps(args: argparse.Namespace, tool: str, train: Path, heldout: Path) -> None:
    """atlasvi's fit from its initial weights of args.init (one ulp off for "atlasvi_ulp"), dropout off, the step
    noise; its record as `tool`. "atlasvi" also writes the initial weights (scvi-tools' names) and the minibatches'
    cell names (per step) for scvi-tools' replay."""
    import anndata as ad
    import torch

    import atlasvi.models.vae as vae_module
    from atlasvi.data import LoaderConfig, StreamingLoader
    from atlasvi.models.ldvae import LDVAEModule
    from atlasvi.train import TrainConfig, fit
    from benchmarks.fidelity_data import save_init

    torch.set_num_threads(1)
    torch.manual_seed(args.init)  # ldvae_fidelity.py's initial weights of that seed
    loader = StreamingLoader(train, LoaderConfig(batch_size=args.batch_size, seed=args.stream))
    validation = StreamingLoader(heldout, LoaderConfig(batch_size=args.batch_size))
    module = LDVAEModule(loader.store.schema)
    if tool == "atlasvi":
        save_init(module.state_dict(), "LinearSCVI", FOLDER / "init.pt")
    else:
        module.load_state_dict(_perturbed(module.state_dict(), args.init))
    dropout = _dropout_rates(module, str)
    _no_dropout(module)
    _ldvae_step_noise()
    record = _LDVAERecord(tool, module.config.n_latent)
    unpack, forward = module.unpack, module.forward

    def unpack_step(batch):
        if torch.is_grad_enabled():  # a training step (evaluation runs without autograd)
            record.start(_state(module), batch.rows.numpy())
        return unpack(batch)

    module.unpack, module.forward = unpack_step, record.recorded(forward)
    config = TrainConfig(max_epochs=args.epochs, n_epochs_kl_warmup=args.n_epochs_kl_warmup, seed=args.stream)
    if args.nb_formula == "scvi-tools":  # scvi-tools' NB log-likelihood in atlasvi's module (its validation too)
        with patched(vae_module, "log_likelihood", scvi_nb_log_likelihood):
            history = fit(module, loader, validation, config)
    else:
        history = fit(module, loader, validation, config)
    record.finish(_state(module))
    record.save_fit(history, ad.read_zarr(train).obs_names, dropout)


def scvi_steps(args: argparse.Namespace) -> None:
    """scvi-tools' LinearSCVI.train from atlasvi's initial weights on atlasvi's minibatches (replayed in order), the
    held-out cells as validation cells, dropout off, the step noise; its record as "scvi_tools"."""
    import logging

    import anndata as ad
    import scvi
    import torch
    from scvi import REGISTRY_KEYS

    from benchmarks.fidelity_data import load_init

    torch.set_num_threads(1)
    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = args.stream
    train, held = (ad.read_zarr(p) for p in (args.train, args.heldout))
    adata = ad.concat([train, held])
    adata.X = adata.X.astype(np.float32)
    adata.obs = adata.obs[[]].copy()
    scvi.model.LinearSCVI.setup_anndata(adata)
    model = scvi.model.LinearSCVI(adata)
    load_init(model.module, FOLDER / "init.pt", UNUSED)  # weights and buffers, the library prior included
    recorded = np.load(FOLDER / "steps_atlasvi.npz", allow_pickle=True)
    steps = [adata.obs_names.get_indexer(names) for names in recorded["batches"]]
    bounds = np.cumsum([0, *recorded["epoch_steps"]])
    per_epoch = [steps[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    record = _LDVAERecord("scvi_tools", model.module.n_latent)
    dropout = _dropout_rates(model.module, lambda k: k.replace("fc_layers.Layer 0", "layers.0"))
    _no_dropout(model.module)

    class StepPlan(model._training_plan_cls):
        def training_step(self, batch, batch_idx):
            cells = steps[record.step]  # LinearSCVI registers no cell indices: the counts must be those cells'
            if not np.array_equal(batch[REGISTRY_KEYS.X_KEY].numpy(), adata.X[cells].toarray()):
                raise RuntimeError(f"step {record.step}: scvi-tools' loader gave other cells than atlasvi's")
            record.start(_state(self.module), cells)
            kl_weight = float(self.kl_weight)
            loss = super().training_step(batch, batch_idx)
            record.losses.append(float(loss.detach()))
            record.kl_weights.append(kl_weight)
            return loss

    model._data_splitter_cls, model._training_plan_cls = replay_splitter(model, per_epoch), StepPlan
    _ldvae_step_noise()
    indexing = [np.arange(train.n_obs), np.arange(train.n_obs, adata.n_obs), np.array([], dtype=int)]
    model.train(
        max_epochs=args.epochs, accelerator="cpu", devices=1, batch_size=args.batch_size, early_stopping=False,
        enable_progress_bar=False, check_val_every_n_epoch=1, datasplitter_kwargs={"external_indexing": indexing},
        plan_kwargs={"n_epochs_kl_warmup": args.n_epochs_kl_warmup, "n_steps_kl_warmup": None},
    )  # fmt: skip
    record.finish(_state(model.module))
    history = model.history
    record.save(
        dropout=json.dumps(dropout),
        validation_elbo=np.asarray(history["elbo_validation"], dtype=float).ravel(),
        validation_reconstruction=np.asarray(history["reconstruction_loss_validation"], dtype=float).ravel(),
    )


def report(args: argparse.Namespace) -> dict:
    """Run atlasvi, scvi-tools (a subprocess in its venv) and the ulp reference; their step-by-step differences."""
    started = time.perf_counter()
    FOLDER.mkdir(parents=True, exist_ok=True)
    train, heldout = stores("none", HERE / ".cache" / "fidelity" / "kang")
    for tool in TOOLS:
        if tool == "scvi_tools":
            command = [
                str(SCVI_PYTHON), __file__, "--side", "scvi", "--init", str(args.init), "--stream", str(args.stream),
                "--epochs", str(args.epochs), "--n-epochs-kl-warmup", str(args.n_epochs_kl_warmup),
                "--batch-size", str(args.batch_size), "--train", str(train), "--heldout", str(heldout),
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
            subprocess.run(command, env=env, check=True)
        else:
            atlasvi_steps(args, tool, train, heldout)
    records = {tool: np.load(FOLDER / f"steps_{tool}.npz", allow_pickle=True) for tool in TOOLS}
    pairs = {
        "atlasvi - scvi-tools": ("atlasvi", "scvi_tools"),
        "atlasvi - atlasvi one ulp off (float-drift reference)": ("atlasvi", "atlasvi_ulp"),
    }
    n_steps = len(records["atlasvi"]["loss"])
    kept = [s for s in SNAPSHOTS if s < n_steps] + [n_steps]
    return {
        "meta": {
            "command": " ".join(["python", "benchmarks/ldvae_step_check.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
            "load_average_at_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - started,
            "init": args.init,
            "stream": args.stream,
            "epochs": args.epochs,
            "n_epochs_kl_warmup": args.n_epochs_kl_warmup,
            "nb_formula": args.nb_formula,
            "steps": n_steps,
            "epoch_steps": records["atlasvi"]["epoch_steps"].tolist(),
        },
        "dropout_rates_in_normal_training": {t: json.loads(str(records[t]["dropout"])) for t in TOOLS[:2]},
        "losses": {t: r["loss"].tolist() for t, r in records.items()},
        "kl_weights": {t: r["kl_weight"].tolist() for t, r in records.items()},
        "validation": {
            t: {k: r[k].tolist() for k in ("validation_elbo", "validation_reconstruction")} for t, r in records.items()
        },
        "differences": {label: _step_differences(records[a], records[b]) for label, (a, b) in pairs.items()},
        "snapshots": {label: _snapshot_differences((a, b), kept, FOLDER) for label, (a, b) in pairs.items()},
    }


def markdown(report: dict) -> str:
    meta, losses, pairs = report["meta"], report["losses"], list(report["differences"])
    shown = sorted({0, *(s for s in SNAPSHOTS if s < meta["steps"]), meta["steps"] - 1})
    lines = [
        "# LDVAE: many training steps of atlasvi and scvi-tools 1.4.2 from the same weights, minibatches and noise",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])}; {meta['seconds']:.0f} s in all.",
        "",
        f"{meta['steps']} steps ({meta['epochs']} epochs of {meta['epoch_steps'][0]} minibatches of Kang's 1400 "
        f"training cells, no batch covariate, KL warm-up {meta['n_epochs_kl_warmup']} epochs), atlasvi's initial "
        f"weights of seed {meta['init']} in both tools, atlasvi's minibatches of stream {meta['stream']}, dropout "
        "off, the same noise per step (benchmarks/ldvae_step_check.py). Weights: max |a - b| / max |a| per tensor on "
        "2,048 fixed entries of each (all of a smaller one), the largest and the median over every tensor (weights "
        "and buffers), before the step (step = steps done). Loss: |a - b| / |a|. "
        + (
            "atlasvi (both runs) trains with scvi-tools' NB log-likelihood patched in "
            "(benchmarks/ldvae_peakvi_step.py's `scvi_nb_log_likelihood`: eps 1e-8 inside the logs, float32 "
            "log-gammas)."
            if meta["nb_formula"] == "scvi-tools"
            else "Each tool with its own NB log-likelihood (atlasvi's: no eps, float64 log-gamma ratio)."
        ),
        "",
        *step_table(report, shown),
    ]
    lines += ["", "Step loss, over all steps (nats per cell):", ""]
    for p, (a, b) in zip(pairs, (("atlasvi", "scvi_tools"), ("atlasvi", "atlasvi_ulp")), strict=True):
        signed = np.array(losses[a]) - np.array(losses[b])
        lines.append(
            f"- {p}: {signed.mean():+.4f} ± {signed.std(ddof=1):.4f} (largest |difference| "
            f"{np.abs(signed).max():.4f}); KL weights within {report['differences'][p]['kl_weight_largest_diff']:.1e}."
        )
    lines += ["", "Every tensor in full (max |a - b| / max |a|, the largest tensor; median over tensors):", ""]
    lines += snapshot_table(report)
    rates = report["dropout_rates_in_normal_training"]
    same = rates["atlasvi"] == rates["scvi_tools"]
    lines += [
        "",
        "Dropout (off here) in the tools' normal training: "
        + ("the same layers with the same rates" if same else "DIFFERENT")
        + f" (atlasvi {rates['atlasvi']}; scvi-tools {rates['scvi_tools']}).",
        "",
        "Held-out -ELBO / reconstruction per cell after each epoch (KL weight 1, posterior means):",
        "",
        *validation_table(report),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=int, default=3, help="the seed of atlasvi's initial weights")
    parser.add_argument("--stream", type=int, default=3, help="the seed of atlasvi's loader and fit")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--nb-formula", choices=["atlasvi", "scvi-tools"], default="atlasvi",
        help="atlasvi trains with its own NB log-likelihood or scvi-tools' (eps 1e-8 in the logs, float32 lgamma)",
    )  # fmt: skip
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: scvi-tools' run")
    parser.add_argument("--train", help="internal (scvi side)")
    parser.add_argument("--heldout", help="internal (scvi side)")
    args = parser.parse_args()
    if args.side == "scvi":
        return scvi_steps(args)
    import torch

    torch.set_num_threads(1)
    result = report(args)
    name = "ldvae_step_check" + ("_scvi_nb" if args.nb_formula == "scvi-tools" else "")
    results = HERE / "results"
    (results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
