"""Models: one folder per method (module: inference / generative / loss), shared LossOutput.

A model knows nothing of Ray or MLflow (an import contract in CI keeps it so).
"""

from atlasvi.models.loss import LossOutput

__all__ = ["LossOutput"]
