"""The one training loop (plain process or Ray Train worker), KL schedule and checkpoints."""

from atlasvi.train.loop import EpochRecord, TrainConfig, TrainingDiverged, evaluate, fit, kl_weight

__all__ = ["EpochRecord", "TrainConfig", "TrainingDiverged", "evaluate", "fit", "kl_weight"]
