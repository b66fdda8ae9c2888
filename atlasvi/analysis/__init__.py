"""Streaming analysis of trained models (latent, normalized expression, held-out ELBO) and figures."""

from atlasvi.analysis.posterior import elbo, latent_representation, minibatches, normalized_expression

__all__ = ["elbo", "latent_representation", "minibatches", "normalized_expression"]
