"""The CUDA sources of dbgen's bitwise kernels, installed inside the package as ``dbgen._kernels_src``
(pyproject.toml maps this folder there) so that an installed dbgen can build them; see dbgen/kernels/cuda.py."""
