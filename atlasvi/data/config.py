"""Frozen, validated configs of the data layer (pydantic; unknown fields are an error)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildConfig(_Frozen):
    """How `atlasvi build` turns input files into one atlas store.

    inputs: `.h5ad` files, `.h5mu` files (the "rna" modality is X), 10x matrix folders (matrix.mtx[.gz] +
      features/genes + barcodes) or 10x `.h5`.
    batch_key: obs column holding the batch; None makes one batch per input file (named by file).
    gene_join: "inner" keeps genes present in every input, "outer" fills missing genes with zeros.
    n_top_genes: Seurat v3 HVG selection on counts (batch-aware); None keeps every gene.
    zero_count_cells: "error" refuses cells whose counts sum to 0, "drop" drops them with a warning.
    chunk_size: cells read from an input at a time; peak memory scales with it, not with the cell count.
    compressor: Blosc codec of every chunk: lz4 (the default) decodes 1.3-2x as fast as zstd, whose store is ~17%
      smaller (1M cells x 2,000 genes: benchmarks/README.md, "Loader and build").
    unlabeled_category: the labels category of cells without a label (missing values are stored as it).
    unlabeled_batches: batches whose cells are stored as unlabeled (a reference / query split for label
      transfer: the query batches' labels are not seen by the model).
    annotation_keys: obs columns kept as categorical obs columns of the store that no model conditions on
      (e.g. a condition to group cells by in `atlasvi de`); missing values stay missing.
    protein_key: read surface-protein counts (CITE-seq) too: an `.h5ad`'s obsm[protein_key] (a DataFrame of
      antibodies, or an array named by uns[protein_key + "_names"]); an `.h5mu`'s modality protein_key (e.g.
      "prot", cells matched to the "rna" modality's by name); a 10x `.h5`'s Antibody Capture features.
      The store keeps them in obsm["protein_expression"] with a mask of what each cell measured.
    atac_key: read scATAC peak counts too (the store's "atac" modality, CSR in obsm["atac"]): an `.h5ad`'s
      obsm[atac_key] with the peaks in uns[atac_key + "_names"], an `.h5mu`'s modality atac_key (e.g. "atac"),
      a 10x `.h5`'s Peaks features; inputs with peaks must share one peak set.
    spatial_key: the obsm key of spatial coordinates (spots x 2 or 3) in `.h5ad` inputs (in an `.h5mu`, its RNA
      modality's); kept, with each cell, as the store's obsm["spatial"] when every input has them (a warning
      names the first input without them otherwise); None reads none.
    genes: the gene ids to store, in this order (e.g. a trained model's, to use it on new data); each must be in
      the inputs (with gene_join "outer", a gene no input has is stored as zeros), the other genes are dropped;
      not with n_top_genes.
    overwrite: replace an existing atlas store at `output` (anything else there is refused).
    Cell names repeated across (or within) inputs are made unique as anndata's `obs_names_make_unique`
    does (later occurrences become NAME-1, NAME-2, ...), with a warning.
    """

    inputs: list[str] = Field(min_length=1)
    output: str
    batch_key: str | None = None
    labels_key: str | None = None
    unlabeled_category: str = Field(default="Unknown", min_length=1)
    unlabeled_batches: list[str] = []
    categorical_covariate_keys: list[str] = []
    continuous_covariate_keys: list[str] = []
    annotation_keys: list[str] = []
    layer: str | None = None
    gene_id_key: str | None = None
    atac_key: str | None = Field(default=None, min_length=1)
    protein_key: str | None = Field(default=None, min_length=1)
    spatial_key: str | None = Field(default="spatial", min_length=1)
    gene_join: Literal["inner", "outer"] = "inner"
    n_top_genes: int | None = Field(default=None, gt=0)
    genes: list[str] | None = Field(default=None, min_length=1)
    hvg_subset: bool = True
    zero_count_cells: Literal["error", "drop"] = "error"
    seed: int = 0
    chunk_size: int = Field(default=32768, gt=0)
    compressor: Literal["zstd", "lz4"] = "lz4"
    compression_level: int = Field(default=3, ge=0, le=9)
    overwrite: bool = False

    @model_validator(mode="after")
    def _keys_distinct(self) -> "BuildConfig":
        keys = [self.batch_key, self.labels_key, *self.categorical_covariate_keys, *self.continuous_covariate_keys]
        named = [k for k in [*keys, *self.annotation_keys] if k is not None]
        if len(named) != len(set(named)):
            raise ValueError(f"an obs key is used twice among batch/labels/covariate/annotation keys: {named}")
        if self.batch_key is None and "batch" in named:
            raise ValueError("with batch_key null the store's batch column is 'batch' (one per input): rename yours")
        if self.unlabeled_batches and self.labels_key is None:
            raise ValueError("unlabeled_batches needs a labels_key")
        if self.genes is not None and self.n_top_genes is not None:
            raise ValueError("genes and n_top_genes exclude each other (genes names the genes to store)")
        if self.genes is not None and len(set(self.genes)) != len(self.genes):
            raise ValueError("genes lists a gene twice")
        return self


class LoaderConfig(_Frozen):
    """How `StreamingLoader` cuts an epoch into minibatches.

    block_size: cells per shuffled block (the unit of the epoch permutation and of sequential reads).
    buffer_blocks: blocks read into the shuffle buffer before minibatches are cut from it.
    last_batch: "keep" (scvi-tools' behaviour) ends each rank's epoch on a short minibatch, the same
      size on every rank; "drop" drops the epoch's tail that does not fill a batch on every rank;
      "pad" repeats cells from the start of the epoch so no cell is dropped.
    shuffle: False reads the rows in store order with no shuffling (inference, write-back).
    prefetch: buffers read ahead by background threads.
    backend: "auto" (tensorstore for a local store or an http(s) URL, zarr-python for s3:// and other fsspec URLs;
      on a local store X's counts are decoded straight from its shard files, `atlasvi.data.shards`), "zarr"
      (zarr-python), "zarrs" (zarr-python with the Rust codec pipeline of the optional `zarrs` package) or
      "tensorstore"; all yield identical batches ("auto" reads fastest: benchmarks/README.md, "Loader and build").
    resident: whether training (`atlasvi.train.make_loaders`) holds the store's rows in memory on the training
      device, read once, and cuts the minibatches there (`atlasvi.data.resident`: the very same minibatches as
      streaming); "auto" does when they fit resident_budget_mb, else streams.
    resident_budget_mb: the memory "auto" allows the rows (MiB); None: half the free memory of a CUDA device, or a
      quarter of the available RAM shared by the ranks on CPU.
    """

    batch_size: int = Field(default=128, gt=0)
    block_size: int = Field(default=16384, gt=0)
    buffer_blocks: int = Field(default=2, gt=0)
    last_batch: Literal["keep", "drop", "pad"] = "keep"
    seed: int = 0
    shuffle: bool = True
    prefetch: int = Field(default=2, ge=1)
    num_threads: int = Field(default=2, ge=1)
    backend: Literal["auto", "zarr", "zarrs", "tensorstore"] = "auto"
    resident: Literal["auto"] | bool = "auto"
    resident_budget_mb: float | None = Field(default=None, gt=0)
