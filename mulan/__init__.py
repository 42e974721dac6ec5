"""mulan: likelihood-based diffusion with learned, multivariate, input-adaptive noise schedules."""

__version__ = "0.1.0"
