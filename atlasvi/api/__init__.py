"""User-facing model classes (scvi-tools' vocabulary): fit, posterior quantities, save / load.

They compose the layers below (module, training loop, streaming analysis); nothing below imports them.
Which class a saved model is comes from the model registry (`atlasvi.models.registry`).
"""

from pathlib import Path

from atlasvi.api.base import AtlasModel, user_class
from atlasvi.api.interop import export_scvi_tools, import_scvi_tools
from atlasvi.api.ldvae import LinearSCVI
from atlasvi.api.multivi import MULTIVI
from atlasvi.api.peakvi import PEAKVI
from atlasvi.api.scanvi import SCANVI
from atlasvi.api.scvi import SCVI
from atlasvi.api.sysvi import SysVI
from atlasvi.api.totalvi import TOTALVI
from atlasvi.models.registry import ENTRIES
from atlasvi.models.saving import META_NAME, ModelFileError, read_meta

__all__ = [
    "METHODS",
    "MULTIVI",
    "PEAKVI",
    "AtlasModel",
    "LinearSCVI",
    "SCANVI",
    "SCVI",
    "TOTALVI",
    "SysVI",
    "export_scvi_tools",
    "import_scvi_tools",
    "saved_model_class",
    "user_class",
]


METHODS: dict[str, type[AtlasModel]] = {entry.saved_name: user_class(entry) for entry in ENTRIES}


def saved_model_class(directory: str | Path) -> type[AtlasModel]:
    """The user class of the model saved in `directory` (any registered method), from its model.json's method."""
    method = read_meta(Path(directory))["method"]
    if method not in METHODS:
        raise ModelFileError(f"{Path(directory) / META_NAME}: a saved {method} model; atlasvi loads {sorted(METHODS)}")
    return METHODS[method]
