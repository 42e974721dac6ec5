"""Likelihood estimators: the ELBO with stratified times, and the exact probability-flow ODE likelihood.

Estimators take plain callables (see :class:`mulan.diffusion.Conditioned`), so any network with the
model's signature can be evaluated.
"""
