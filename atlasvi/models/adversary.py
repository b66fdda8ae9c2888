"""The adversarial batch classifier of scvi-tools' AdversarialTrainingPlan (totalVI with missing proteins, MultiVI).

A classifier predicts each cell's batch from its latent z; the model is pushed to fool it (to make z carry no
batch), and the classifier, trained by its own optimizer (Adam, lr 1e-3, eps 0.01, the run's weight decay), to
tell the batches apart. Both terms are scaled by kappa = 1 - kl_weight (scvi-tools' scale_adversarial_loss
"auto"). The loop (`atlasvi.train.fit`) builds that optimizer for a module's `adversary` and backpropagates
`LossOutput.adversary_loss` with the loss.

scvi-tools runs two backward passes (the model's loss, then the classifier's on z.detach()); here one pass does
both: the fooling term sees the classifier's parameters detached, so the classifier's gradient comes from its own
loss alone and the model's from the fooling term alone, as in scvi-tools, and under DDP one backward reduces both.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from atlasvi.nn import FCLayers


class BatchAdversary(nn.Module):
    """scvi-tools' Classifier(n_latent, n_hidden=32, n_labels=n_batch, n_layers=2, logits=True): FCLayers
    (batch norm, ReLU, dropout 0.1) then a Linear to the batch logits."""

    def __init__(self, n_latent: int, n_batch: int, n_hidden: int = 32, n_layers: int = 2):
        super().__init__()
        if n_batch < 2:
            raise ValueError("an adversarial batch classifier needs at least 2 batches")
        self.n_batch = n_batch
        self.classifier = nn.Sequential(
            FCLayers(n_latent, n_hidden, (), n_layers, n_hidden, 0.1), nn.Linear(n_hidden, n_batch)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(n, n_batch) logits of z (n, n_latent)."""
        return self.classifier(z)

    def losses(self, z: torch.Tensor, batch_index: torch.Tensor, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(fooling term for the model's loss, the classifier's own loss), scalars, both x kappa.

        fooling: -mean over cells of sum_b log softmax(logits)_b t_b with t uniform over the OTHER batches (the
        classifier's parameters detached); own: cross-entropy of the true batch on z.detach() (scvi-tools'
        loss_adversarial_classifier with predict_true_class False / True).
        """
        batch_index = batch_index.long().view(-1)
        frozen = {name: p.detach() for name, p in self.named_parameters()} | dict(self.named_buffers())
        log_p = F.log_softmax(functional_call(self, frozen, (z,)), dim=-1)
        others = 1.0 - F.one_hot(batch_index, self.n_batch).to(log_p.dtype)
        fooling = -(log_p * others / (self.n_batch - 1)).sum(dim=-1).mean()
        own = F.cross_entropy(self(z.detach()), batch_index)
        return fooling * kappa, own * kappa
