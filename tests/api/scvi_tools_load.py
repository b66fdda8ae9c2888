"""scvi-tools' side of tests/api/test_interop.py, run in a subprocess by an interpreter that has scvi-tools 1.4.2:

    python tests/api/scvi_tools_load.py FOLDER:SCVI [FOLDER:SCANVI FOLDER:LinearSCVI FOLDER:TOTALVI ...]

Loads each exported FOLDER with `scvi.model.<CLASS>.load(FOLDER, anndata.read_zarr(store))` (the store's path is
FOLDER/store; scvi.external.SysVI for SysVI, with X the store's counts log-normalised to 1e4 per cell; for MULTIVI a
MuData of modality "rna" (the store) and "atac" (its obsm["atac"], peaks named by uns["atac_names"])) and writes
its latent and its normalized expression with z at the posterior mean (scvi-tools draws z once, and totalVI its log
protein background; each draw is replaced by the mean) as FOLDER/scvi_tools_{latent,normalized}.npy: for PEAKVI the
normalized accessibility, for TOTALVI also the normalized protein expression (scvi_tools_protein.npy), for SysVI
the decoder's mean (it has no get_normalized_expression), for MULTIVI also the normalized accessibility
(scvi_tools_accessibility.npy).
"""

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
import torch
from torch.distributions import Normal


def _posterior_mean(self: Normal, sample_shape: tuple = ()) -> torch.Tensor:
    return self.loc.expand(torch.Size(sample_shape) + self.loc.shape)


def main(folder: Path, cls: str) -> None:
    torch.set_num_threads(1)
    adata = ad.read_zarr((folder / "store").read_text())
    if cls == "SysVI":
        counts = np.asarray(adata.X.todense(), dtype=np.float32)
        total = np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
        adata.X = np.log1p(counts / total * np.float32(1e4))
    if cls == "MULTIVI":
        import mudata as md

        atac = ad.AnnData(adata.obsm["atac"], obs=adata.obs[[]].copy())
        atac.var_names = [str(p) for p in adata.uns["atac_names"]]
        adata = md.MuData({"rna": adata, "atac": atac})
    model = (scvi.external.SysVI if cls == "SysVI" else getattr(scvi.model, cls)).load(
        str(folder), adata, accelerator="cpu"
    )
    if cls == "DestVI":  # no latent: its proportions and per-type states of every spot
        np.save(folder / "scvi_tools_proportions.npy", model.get_proportions().to_numpy())
        np.save(folder / "scvi_tools_gamma.npy", model.get_gamma(return_numpy=True))
        return
    np.save(folder / "scvi_tools_latent.npy", model.get_latent_representation())
    Normal.sample = Normal.rsample = _posterior_mean
    if cls == "PEAKVI":
        normalized = model.get_normalized_accessibility(adata, use_z_mean=True, return_numpy=True)
    elif cls == "SysVI":
        module = model.module.eval()
        system = torch.as_tensor(adata.obs["_scvi_batch"].to_numpy()).long()  # codes in the registry's order
        with torch.no_grad():
            x, system = torch.as_tensor(adata.X), system.view(-1, 1)
            qz = module.encoder(x, batch_index=system, cat_list=[])["q_dist"]
            normalized = module.decoder(qz.loc, batch_index=system, cat_list=[])["q_dist"].loc.numpy()
    elif cls == "MULTIVI":
        normalized = model.get_normalized_expression(adata, return_numpy=True)
        accessibility = model.get_normalized_accessibility(adata, return_numpy=True)
        np.save(folder / "scvi_tools_accessibility.npy", np.asarray(accessibility, dtype=np.float32))
    elif cls == "TOTALVI":
        normalized, protein = model.get_normalized_expression(adata, return_numpy=True)
        np.save(folder / "scvi_tools_protein.npy", np.asarray(protein, dtype=np.float32))
    else:
        normalized = model.get_normalized_expression(adata, return_numpy=True)
    np.save(folder / "scvi_tools_normalized.npy", np.asarray(normalized, dtype=np.float32))


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        folder, cls = argument.rsplit(":", 1)
        main(Path(folder), cls)
