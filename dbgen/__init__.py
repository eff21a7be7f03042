"""dbgen: distributed training of binary generative models (BWN ResNet VAE and Flow++)."""

__version__ = "0.1.0"
