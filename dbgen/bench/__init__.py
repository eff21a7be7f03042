"""Benchmarks: ``python -m dbgen.bench {train,data,comm} ...``. Each prints a table; ``--json`` prints JSON."""
