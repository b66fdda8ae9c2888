"""`SysVI`: sysVI integration across systems on an atlas store, as scvi-tools users know it.

`AtlasModel` (fit, latent, ELBO, save / load, `load_query_data`) and nothing more: the latent is the product
(`obsm["X_sysvi"]`). scvi-tools' SysVI offers no decoded expression ("not recommended"), and a Gaussian on
log-normalised values gives no count-scale expression or DE of the kind `ExpressionExtras` computes.
The store holds raw counts; the module log-normalises each cell itself (normalize_total to the config's
target_sum over the store's genes, then log1p). The system is the store's batch key, or the config's
`system_key` (another categorical covariate).
"""

from atlasvi.api.base import AtlasModel
from atlasvi.models.sysvi import SysVIConfig, SysVIModule

__all__ = ["SysVI"]


class SysVI(AtlasModel):
    """sysVI trained on `store` (a path, URL or open AtlasStore). device: "auto", "cpu" or "cuda".

    fit trains without KL warm-up unless one is asked for (the registry entry's train_defaults; scvi-tools'
    SysVI.train sets both warm-ups to 0 even when asked); the epoch records' extra_metrics hold the cycle loss.
    seed: the initial weights are drawn from it alone (in a scope of their own; the global RNG is untouched).
    registry: the model's genes and categories when they are not the store's own (set by `load`).
    """

    method = "SysVI"
    module: SysVIModule
    config: SysVIConfig
