"""User-facing model classes (scvi-tools' vocabulary): fit, posterior quantities, save / load.

They compose the layers below (module, training loop, streaming analysis); nothing below imports them.
"""

from atlasvi.api.scanvi import SCANVI
from atlasvi.api.scvi import SCVI

__all__ = ["SCANVI", "SCVI"]
