"""dbgen: distributed training of binary generative models (BWN ResNet VAE and Flow++)."""

__version__ = "0.1.0"


def __getattr__(name):
    # dbgen.load_packed without importing torch at `import dbgen`
    if name == "load_packed":
        from .export import load_packed

        return load_packed
    raise AttributeError(f"module 'dbgen' has no attribute {name!r}")
