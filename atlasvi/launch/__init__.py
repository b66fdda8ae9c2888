"""Ray launch: the one training loop in N Ray Train workers, the build on Ray actors (the only package that imports
Ray)."""

from atlasvi.launch.ray_build import RayBuildExecutor
from atlasvi.launch.ray_train import DistributedConfig, connect, train_distributed

__all__ = ["DistributedConfig", "RayBuildExecutor", "connect", "train_distributed"]
