"""dbgen: distributed training of binary generative models (BWN ResNet VAE and Flow++)."""

from ._version import __version__

__all__ = ["__version__", "load_packed"]


def __getattr__(name):
    # dbgen.load_packed without importing torch at `import dbgen` (the data CLIs import dbgen and need no torch)
    if name == "load_packed":
        from .export import load_packed

        return load_packed
    raise AttributeError(f"module 'dbgen' has no attribute {name!r}")
