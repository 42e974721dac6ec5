"""mulan: likelihood-based diffusion with learned, multivariate, input-adaptive noise schedules."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``mulan.load`` without importing torch when only the package (e.g. the CLI's --help) is needed.
    if name in ("load", "Loaded"):
        from mulan import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'mulan' has no attribute {name!r}")


__all__ = ["load", "Loaded", "__version__"]
