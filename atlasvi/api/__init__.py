"""User-facing model classes (scvi-tools' vocabulary): fit, posterior quantities, save / load.

They compose the layers below (module, training loop, streaming analysis); nothing below imports them.
"""

from pathlib import Path

from atlasvi.api.scanvi import SCANVI
from atlasvi.api.scvi import SCVI
from atlasvi.models.saving import META_NAME, ModelFileError, read_meta

__all__ = ["METHODS", "SCANVI", "SCVI", "saved_model_class"]

METHODS: dict[str, type[SCVI]] = {"SCVI": SCVI, "SCANVI": SCANVI}


def saved_model_class(directory: str | Path) -> type[SCVI]:
    """The class (SCVI or SCANVI) of the model saved in `directory`, from its model.json."""
    method = read_meta(Path(directory))["method"]
    if method not in METHODS:
        raise ModelFileError(f"{Path(directory) / META_NAME}: a saved {method} model; atlasvi loads {sorted(METHODS)}")
    return METHODS[method]
