"""`SCVI`: scVI on an atlas store, as scvi-tools users know it (fit, get_latent_representation, ...).

`AtlasModel` (fit, latent, ELBO, save / load, scArches) with normalized expression and DE
(`ExpressionExtras`). Posterior quantities stream over the store (one minibatch in memory); the `write_*`
methods put them back into the store chunk by chunk (`obsm["X_scvi"]`, `layers[...]`), atomically.
"""

from atlasvi.api.extras import ExpressionExtras
from atlasvi.models.scvi import SCVIConfig, SCVIModule

__all__ = ["SCVI"]


class SCVI(ExpressionExtras):
    """scVI trained on `store` (a path, URL or open AtlasStore). device: "auto", "cpu" or "cuda".

    seed: the initial weights are drawn from it alone (in a scope of their own; the global RNG is untouched).
    registry: the model's genes and categories when they are not the store's own (set by `load`).
    query_masks: after `load_query_data`, the entries of each parameter that train (the new batch columns).
    """

    method = "SCVI"
    module: SCVIModule
    config: SCVIConfig
