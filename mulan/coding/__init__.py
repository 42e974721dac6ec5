"""Lossless compression at the model's bound: bits-back coding over the discrete-time chain."""
