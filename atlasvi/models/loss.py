"""What every module's `loss` returns."""

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """loss: scalar to minimise, the minibatch mean of reconstruction + kl_weight-weighted KL terms.

    reconstruction_loss: (n,) -log p(x | latents) per cell (nats); kl_local: name -> (n,) KL per cell.
    extra_metrics: name -> scalar of the minibatch to log (e.g. scANVI's classification loss), detached.
    adversary_loss: scalar loss of the module's `adversary` (`atlasvi.models.adversary`), which its own optimizer
    minimises; backpropagated with `loss`, it reaches the adversary's parameters alone.
    objective_scale: the optimizer minimises loss x objective_scale (1 but for a method whose scvi-tools loss is a
    multiple of the per-cell mean that Adam's eps sees: PeakVI's, n^2 for n cells); the logged loss is `loss`.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_local: dict[str, torch.Tensor]
    extra_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    adversary_loss: torch.Tensor | None = None
    objective_scale: float = 1.0

    @property
    def negative_elbo(self) -> torch.Tensor:
        """(n,) -ELBO per cell at KL weight 1: reconstruction + every KL term (nats)."""
        return self.reconstruction_loss + sum(self.kl_local.values())
