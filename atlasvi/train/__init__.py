"""The one training loop (plain process or Ray Train worker), KL schedule and checkpoints."""

from atlasvi.train.loop import (
    EpochRecord,
    TrainConfig,
    TrainingDiverged,
    default_max_epochs,
    evaluate,
    fit,
    kl_weight,
    pretrained_max_epochs,
    training_seed,
)

__all__ = [
    "EpochRecord",
    "TrainConfig",
    "TrainingDiverged",
    "default_max_epochs",
    "evaluate",
    "fit",
    "kl_weight",
    "pretrained_max_epochs",
    "training_seed",
]
