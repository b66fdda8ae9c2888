"""A training job's configuration and the pieces every runner shares (plain process, Ray worker, API).

`TrainJobConfig` is what `atlasvi train` reads from YAML: the store, the model, the optimisation, the
loader and where outputs go; every field has a default that serves (the embedded dataset, scVI with
scvi-tools' defaults).
"""

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from atlasvi.data import LoaderConfig, StreamingLoader, split_rows
from atlasvi.data.store import AtlasStore
from atlasvi.models.registry import ModelConfig, default_model_config
from atlasvi.train.loop import TrainConfig


class TrainJobConfig(BaseModel):
    """`atlasvi train`. store None: the embedded CellBench store (built on first use).

    output: folder of the saved model and checkpoints; latent_key: obsm key the latent is written back
    to (None: not written); umap_cells: cells in the UMAP figure (the store's first rows, a random sample);
    torch_threads: CPU intra-op threads (None: see `cpu_threads`). num_workers > 1 trains in Ray Train
    workers (use_gpu: one GPU each), restarting the group up to max_failures times; storage_path: where
    Ray persists checkpoints, absolute or a URI (None: OUTPUT/ray_results).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str | None = None
    model: ModelConfig = Field(default_factory=default_model_config)
    train: TrainConfig = TrainConfig()
    loader: LoaderConfig = LoaderConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: str = "outputs/scvi"
    latent_key: str | None = "X_scvi"
    experiment: str = "atlasvi"
    run_name: str | None = None
    umap_cells: int = Field(default=20000, ge=0)
    torch_threads: int | None = Field(default=None, gt=0)
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    max_failures: int = Field(default=3, ge=0)
    storage_path: str | None = None

    def cpu_threads(self, n_cores: int) -> int:
        """torch intra-op threads on CPU: torch_threads, else the cores the loader's read threads leave (>= 1).

        OpenMP threads spin-wait: on 2 busy cores, 2 torch threads next to the read threads ran a step ~40x
        slower than 1.
        """
        return self.torch_threads or max(1, n_cores - self.loader.num_threads)


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA where available, else CPU; "cuda" without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loaders(
    store: AtlasStore,
    loader: LoaderConfig,
    validation_fraction: float,
    rank: int = 0,
    world_size: int = 1,
    code_maps: dict[str, np.ndarray] | None = None,
) -> tuple[StreamingLoader, StreamingLoader]:
    """(train, validation) loaders of one rank on the seeded split of the store's rows (see `split_rows`).

    The validation loader reads its rows in order (no shuffling), with the training batch size.
    code_maps: store code -> model code per categorical key (see `StreamingLoader`).
    """
    train_rows, validation_rows = split_rows(store.n_cells, validation_fraction)
    if validation_rows[0] == validation_rows[1]:
        raise ValueError("validation_fraction leaves no held-out cell; the loop evaluates on held-out cells")
    train = StreamingLoader(store, loader, rank, world_size, rows=train_rows, code_maps=code_maps)
    held_out = loader.model_copy(update={"shuffle": False})
    return train, StreamingLoader(store, held_out, rank, world_size, rows=validation_rows, code_maps=code_maps)
