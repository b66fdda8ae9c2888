"""Ray launch: the one training loop in N Ray Train workers (the only package that imports Ray)."""

from atlasvi.launch.ray_train import DistributedConfig, connect, train_distributed

__all__ = ["DistributedConfig", "connect", "train_distributed"]
