"""User-facing model classes (scvi-tools' vocabulary): fit, posterior quantities, save / load.

They compose the layers below (module, training loop, streaming analysis); nothing below imports them.
"""

import json
from pathlib import Path

from atlasvi.api.scanvi import SCANVI
from atlasvi.api.scvi import SCVI
from atlasvi.models.saving import META_NAME

__all__ = ["METHODS", "SCANVI", "SCVI", "saved_model_class"]

METHODS: dict[str, type[SCVI]] = {"SCVI": SCVI, "SCANVI": SCANVI}


def saved_model_class(directory: str | Path) -> type[SCVI]:
    """The class (SCVI or SCANVI) of the model saved in `directory`, from its model.json."""
    meta = Path(directory) / META_NAME
    if not meta.exists():
        raise FileNotFoundError(f"{directory}: no saved model here (no {META_NAME})")
    method = json.loads(meta.read_text()).get("method")
    if method not in METHODS:
        raise ValueError(f"{meta}: a saved {method} model; atlasvi loads {sorted(METHODS)} models")
    return METHODS[method]
