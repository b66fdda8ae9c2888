"""DestVI's rare cell types on a real pair, atlasvi vs scvi-tools 1.4.2: where the two tools' fits differ.

    PYTHONPATH=. .venv/bin/python benchmarks/destvi_rare.py --dataset pdac --epochs 300,100 --seeds 0 1

Reads the trained models that benchmarks/destvi_real.py keeps in its workdir ({dataset}_{seed}_{tool}_e{c}-{d}.models)
and exports from each (scvi-tools in its venv, `--side scvi`; `export`): (1) the CondSCVI reference fit, per cell
type: the reconstruction NLL per cell at the posterior means, and the type's mean decoded expression fractions;
(2) the prototypes (DestVI's mixture prior: the per-type k-means of the reference's posteriors) and the expression
they decode to, mixed by their weights, once with the CondSCVI's batch embedding and once as the spatial model sees
them (its own batch embedding and the gene-wise correction beta); (3) the spatial model's proportions with the dummy
type, unnormalised, and beta.

Per cell type (rarest first; the reference's cells per type) and tool, averaged over --seeds: the reference NLL per
cell (atlasvi's held-out reference cell left out of both tools') and the median over the type's cells of the
per-cell NLL difference; the Pearson r of log decoded against log observed mean expression fractions (counts over
each cell's total) of the type; the type's known markers (destvi_real.CANONICAL) as a share of its decoded profile,
of its prototype mixture's profile in the spatial model, and of its observed profile; the proportions' mean, 90th
percentile and the share of spots above 0.05; the dummy type's mean share and beta on the known markers; per seed,
the reference NLL per cell over all cells. Output: results/destvi_rare_{dataset}.json and .md (or --name).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _mixture_profiles(decode, mean_vprior: np.ndarray, mp_vprior: np.ndarray) -> np.ndarray:
    """(n_labels, n_genes): per type, the prototypes' decoded expression fractions mixed by their weights.
    decode(z (n, n_latent), labels (n,)) -> (n, n_genes) fractions."""
    n_labels, p, n_latent = mean_vprior.shape
    labels = np.repeat(np.arange(n_labels), p)
    decoded = decode(mean_vprior.reshape(-1, n_latent), labels).reshape(n_labels, p, -1)
    return np.einsum("lp,lpg->lg", mp_vprior, decoded)


def _per_type(values: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, ...) the mean of `values` (n_cells, ...) over each label's cells."""
    return np.stack([values[labels == c].mean(0) for c in range(n_labels)])


def _save(out: Path, spatial, proportions, decode_reference, decode_spatial, **fields: np.ndarray) -> Path:
    """Write one tool's arrays (the module docstring's) to out: its own fields, then the spatial model's prior
    (means, variances, mixture weights), the prototype mixtures' decoded profiles (reference decoder; spatial decoder
    with beta), the unnormalised proportions (spots x types) and beta. Call under torch.no_grad()."""
    prior = [getattr(spatial, k).numpy() for k in ("mean_vprior", "var_vprior", "mp_vprior")]
    np.savez(
        out, **fields, mean_vprior=prior[0], var_vprior=prior[1], mp_vprior=prior[2],
        profile_reference=_mixture_profiles(decode_reference, prior[0], prior[2]),
        profile_spatial=_mixture_profiles(decode_spatial, prior[0], prior[2]),
        proportions=proportions.to_numpy(), spots=np.asarray(proportions.index, dtype=str),
        beta=spatial.beta.numpy(),
    )  # fmt: skip
    return out


def export_scvi(reference: Path, spots: Path, models: Path, out: Path) -> Path:
    """The arrays of the module docstring from a scvi-tools run's saved models (run in scvi-tools' venv)."""
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    sc_adata, st_adata = ad.read_h5ad(reference), ad.read_h5ad(spots)
    sc_model = scvi.model.CondSCVI.load(str(models / "condscvi"), adata=sc_adata, accelerator="cpu")
    model = scvi.model.DestVI.load(str(models / "destvi"), adata=st_adata, accelerator="cpu")
    module, spatial = sc_model.module.eval(), model.module.eval()
    nll, scale, labels = [], [], []
    with torch.no_grad():
        for tensors in sc_model._make_data_loader(adata=sc_adata, batch_size=1024):
            x, y, batch = tensors["X"], tensors["labels"], tensors["batch"]
            inference = module.inference(x=x, y=y, batch_index=batch)
            px = module.generative(z=inference["qz"].loc, library=inference["library"], y=y, batch_index=batch)["px"]
            nll.append((-px.log_prob(x).sum(-1)).numpy())
            scale.append(px.scale.numpy())
            labels.append(y.view(-1).long().numpy())

        def decoder(own, bias: torch.Tensor | None):
            def decode(z: np.ndarray, y: np.ndarray) -> np.ndarray:
                y_t = torch.as_tensor(y).long().view(-1, 1)
                rep = own.compute_embedding("batch", torch.zeros(len(y), dtype=torch.long))
                h = own.decoder(torch.cat([torch.as_tensor(z, dtype=torch.float32), rep], -1), y_t)
                logits = own.px_decoder(h) + own.per_ct_bias[y_t.view(-1)] + (0 if bias is None else bias)
                return torch.softmax(logits, -1).numpy()

            return decode

        return _save(
            out, spatial, model.get_proportions(keep_additional=True, normalize=False), decoder(module, None),
            decoder(spatial, spatial.beta),
            types=np.asarray(model.cell_type_mapping, dtype=str), genes=np.asarray(sc_adata.var_names, dtype=str),
            nll=np.concatenate(nll), scale=np.concatenate(scale), labels=np.concatenate(labels),
            cells=np.asarray(sc_adata.obs_names, dtype=str), held_out=np.asarray([], dtype=str),
        )  # fmt: skip


def export_atlasvi(models: Path, out: Path) -> Path:
    """The arrays of the module docstring from an atlasvi run's saved models (on the stores they trained on)."""
    import torch

    from atlasvi.api.condscvi import CondSCVI
    from atlasvi.api.destvi import DestVI
    from atlasvi.data.store import read_obs_names
    from atlasvi.models.condscvi.module import decode_scale

    torch.set_num_threads(1)
    sc_model = CondSCVI.load(models / "condscvi", CondSCVI.saved_store(models / "condscvi"), device="cpu")
    model = DestVI.load(models / "destvi", DestVI.saved_store(models / "destvi"), device="cpu")
    module, spatial = sc_model.module.eval(), model.module.eval()
    nll, scale, labels, rows = [], [], [], []
    with torch.no_grad():
        for batch in sc_model._batches(None, None, 1024):
            rows.append(batch.rows.numpy())
            inputs = module.unpack(batch)
            inference = module.inference(inputs)
            generative = module.generative(inference["qz"].loc, inference["library"], inputs)
            nll.append((-generative["px"].log_prob(inputs.x).sum(-1)).numpy())
            scale.append(generative["px_scale"].numpy())
            labels.append(inputs.labels.view(-1).long().numpy())

        def decoder(own, beta: torch.Tensor | None):
            def decode(z: np.ndarray, y: np.ndarray) -> np.ndarray:
                y_t = torch.as_tensor(y).long()
                rep = own.batch_embedding(torch.zeros(len(y), dtype=torch.long))
                z_t = torch.as_tensor(z, dtype=torch.float32)
                return decode_scale(own.decoder, own.px_decoder, own.per_ct_bias, z_t, rep, y_t, beta).numpy()

            return decode

        return _save(
            out, spatial, model.get_proportions(keep_additional=True, normalize=False), decoder(module, None),
            decoder(spatial, spatial.beta),
            types=np.asarray(model.cell_types, dtype=str), genes=np.asarray(sc_model.schema.gene_names, dtype=str),
            nll=np.concatenate(nll), scale=np.concatenate(scale), labels=np.concatenate(labels),
            cells=read_obs_names(sc_model.store.path)[np.concatenate(rows)],
            held_out=read_obs_names(sc_model.store.path, *sc_model.validation_rows),
        )  # fmt: skip


def exported(stem: Path, tool: str, reference: Path, spots: Path, python: str) -> dict[str, np.ndarray]:
    """The arrays of run `stem` (the destvi_real run's csv path without suffix), exported once into stem.rare.npz."""
    out = stem.with_suffix(".rare.npz")
    models = stem.with_suffix(".models")
    if not models.exists():
        raise FileNotFoundError(f"{models}: no saved models (run benchmarks/destvi_real.py for this run first)")
    if not out.exists():
        if tool == "atlasvi":
            export_atlasvi(models, out)
        else:
            env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
            command = [python, __file__, "--side", "scvi", "--reference", str(reference), "--spots", str(spots)]
            command += ["--models", str(models), "--out", str(out)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"scvi-tools export failed:\n{done.stderr[-3000:]}")
    with np.load(out) as data:
        return dict(data)


def observed_profiles(reference: Path, types: list[str], genes: list[str], cells: np.ndarray) -> np.ndarray:
    """(n_types, n_genes) each type's mean over its `cells` of counts / the cell's total (the reference file)."""
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(reference)
    adata = adata[cells, genes]
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    x = x / np.maximum(x.sum(1, keepdims=True), 1)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    return np.stack([x[labels == t].mean(0) for t in types])


def metrics(
    data: dict[str, np.ndarray], observed: np.ndarray, markers: dict[str, list[str]], cells: np.ndarray
) -> dict[str, dict]:
    """Per cell type (by name): the module docstring's figures for one run, the reference's over `cells` (names)."""
    types, genes = list(data["types"]), list(data["genes"])
    n_labels = len(types)
    order = {c: i for i, c in enumerate(data["cells"])}
    keep = np.asarray([order[c] for c in cells])
    labels = data["labels"][keep]
    decoded = _per_type(data["scale"][keep], labels, n_labels)
    nll = _per_type(data["nll"][keep], labels, n_labels)
    proportions = data["proportions"]
    normalised = proportions[:, :n_labels] / proportions[:, :n_labels].sum(1, keepdims=True)
    out = {}
    for c, t in enumerate(types):
        index = [genes.index(g) for g in markers.get(t, []) if g in genes]
        floor = 1e-6
        row = {
            "n_cells": int((labels == c).sum()),
            "reference_nll": float(nll[c]),
            "profile_r": float(np.corrcoef(np.log(decoded[c] + floor), np.log(observed[c] + floor))[0, 1]),
            "n_prototypes": int((data["mp_vprior"][c] > 0).sum()),
            "proportion_mean": float(normalised[:, c].mean()),
            "proportion_p90": float(np.quantile(normalised[:, c], 0.9)),
            "spots_above_0.05": float((normalised[:, c] > 0.05).mean()),
        }
        if index:
            row |= {
                "markers_in_genes": [genes[i] for i in index],
                "marker_share_decoded": float(decoded[c, index].sum()),
                "marker_share_prototypes": float(data["profile_spatial"][c, index].sum()),
                "marker_share_observed": float(observed[c, index].sum()),
                "beta_markers": float(data["beta"][index].mean()),
            }
        out[t] = row
    out["_dummy_share"] = float((proportions[:, n_labels:].sum(1) / proportions.sum(1)).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pdac", choices=["lymph_node", "pdac"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", default="300,100", help="CONDSCVI,DESTVI of the destvi_real runs")
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "destvi")
    parser.add_argument("--scvi-python", default=None)
    parser.add_argument("--side", choices=["scvi"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spots", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--name", default=None, help="results/NAME.{json,md} (default destvi_rare_DATASET)")
    args = parser.parse_args()
    if args.side == "scvi":
        export_scvi(args.reference, args.spots, args.models, args.out)
        return
    from benchmarks import destvi_fidelity as fidelity
    from benchmarks.destvi_real import CANONICAL

    reference, spots = fidelity.real(args.dataset, args.workdir, args.n_genes)
    python = fidelity.scvi_python(args.scvi_python)
    epochs = args.epochs.replace(",", "-")
    tools = ["atlasvi", "scvi-tools"]
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    beta_r = []
    for seed in args.seeds:
        data = {}
        for tool in tools:
            stem = args.workdir / f"{args.dataset}_{seed}_{tool}_e{epochs}"
            data[tool] = exported(stem, tool, reference, spots, python)
        types, genes = list(data["atlasvi"]["types"]), list(data["atlasvi"]["genes"])
        if types != list(data["scvi-tools"]["types"]) or genes != list(data["scvi-tools"]["genes"]):
            raise RuntimeError("the tools' cell types or genes differ")
        held_out = set(data["atlasvi"]["held_out"])  # atlasvi's held-out cell: left out of both tools' figures
        cells = np.asarray([c for c in data["scvi-tools"]["cells"] if c not in held_out])
        observed = observed_profiles(reference, types, genes, cells)
        for tool in tools:
            runs[tool].append(metrics(data[tool], observed, CANONICAL[args.dataset], cells))
        nll = {tool: dict(zip(data[tool]["cells"], data[tool]["nll"], strict=True)) for tool in tools}
        labels = dict(zip(data["scvi-tools"]["cells"], data["scvi-tools"]["labels"], strict=True))
        for c, t in enumerate(types):
            gaps = [nll["atlasvi"][x] - nll["scvi-tools"][x] for x in cells if labels[x] == c]
            runs["atlasvi"][-1][t]["nll_gap_median"] = float(np.median(gaps))
            runs["atlasvi"][-1][t]["nll_gap_cells_above"] = float(np.mean(np.asarray(gaps) > 0))
        beta_r.append(float(np.corrcoef(data["atlasvi"]["beta"], data["scvi-tools"]["beta"])[0, 1]))
    summary = {
        tool: {
            t: {k: float(np.mean([r[t][k] for r in rs])) for k, v in rs[0][t].items() if not isinstance(v, list)}
            for t in rs[0]
            if t != "_dummy_share"
        }
        for tool, rs in runs.items()
    }
    result = {
        "command": "python benchmarks/destvi_rare.py " + " ".join(sys.argv[1:]),
        "dataset": args.dataset,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "runs": runs,
        "summary": summary,
        "dummy_share": {tool: [r["_dummy_share"] for r in rs] for tool, rs in runs.items()},
        "beta_r_between_tools": beta_r,
    }
    RESULTS.mkdir(exist_ok=True)
    name = args.name or f"destvi_rare_{args.dataset}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(render(result))
    print(render(result))


def overall_nll(runs: list[dict]) -> list[float]:
    """Per run (a seed's per-type figures), the reference NLL per cell over all its cells: the types' means weighted
    by their cells."""
    out = []
    for run in runs:
        types = [v for v in run.values() if isinstance(v, dict)]
        cells = np.array([v["n_cells"] for v in types], dtype=float)
        out.append(float((cells * np.array([v["reference_nll"] for v in types])).sum() / cells.sum()))
    return out


def render(result: dict) -> str:
    """The markdown of `result` (see main)."""
    summary = result["summary"]
    tools = list(summary)
    order = sorted(summary[tools[0]], key=lambda t: summary[tools[0]][t]["n_cells"])
    columns = [
        ("reference_nll", "ref. NLL / cell", ".1f"),
        ("profile_r", "r log profile", ".3f"),
        ("marker_share_decoded", "markers, decoded", ".4f"),
        ("marker_share_prototypes", "markers, prototypes (spatial)", ".4f"),
        ("beta_markers", "beta, markers", ".3f"),
        ("proportion_mean", "prop. mean", ".4f"),
        ("proportion_p90", "prop. p90", ".4f"),
        ("spots_above_0.05", "spots > 0.05", ".3f"),
    ]
    lines = [
        f"# DestVI rare cell types, {result['dataset']}: atlasvi vs scvi-tools 1.4.2",
        "",
        f"    {result['command']}",
        "",
        f"Epochs (CondSCVI, DestVI) {result['epochs']}, seeds {result['seeds']}; figures are the mean over the seeds, "
        "each cell `atlasvi / scvi-tools`.",
        "",
        "Dummy type's mean share: "
        + "; ".join(f"{t} {', '.join(f'{v:.4f}' for v in vs)}" for t, vs in result["dummy_share"].items())
        + ".",  # fmt: skip
        "Pearson r of the tools' beta (gene-wise correction) per seed: "
        + ", ".join(f"{v:.3f}" for v in result["beta_r_between_tools"])
        + ".",
        "Reference NLL per cell over all its cells (atlasvi's held-out cell left out) per seed: "
        + "; ".join(f"{t} {', '.join(f'{v:.2f}' for v in overall_nll(rs))}" for t, rs in result["runs"].items())
        + ".",
        "",
        "| cell type | cells | prototypes | "
        + " | ".join(c[1] for c in columns)
        + " | ref. NLL atlasvi - scvi-tools, median per cell (share of cells above 0) | markers, observed |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for t in order:
        a, b = summary[tools[0]][t], summary[tools[1]][t]
        cells = [f"{a[key]:{fmt}} / {b[key]:{fmt}}" if key in a and key in b else "-" for key, _, fmt in columns]
        observed = f"{a['marker_share_observed']:.4f}" if "marker_share_observed" in a else "-"
        gap = f"{a['nll_gap_median']:+.2f} ({a['nll_gap_cells_above']:.2f})"
        lines.append(
            f"| {t} | {a['n_cells']:.0f} | {a['n_prototypes']:.0f} | " + " | ".join(cells) + f" | {gap} | {observed} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
