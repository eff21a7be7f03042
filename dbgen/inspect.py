"""Parameter counts and stored sizes of a config's model.

    python -m dbgen.inspect --config configs/rvae_cifar10_binary.yaml [--json] [model.width=128 ...]

The counts come from :func:`dbgen.nn.size_report` on the model :func:`dbgen.models.build` returns, so they are
what training and checkpoints see; binary layers are found by their type (:func:`dbgen.nn.binary_layers`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from .config import ConfigError, load_config
from .models import build
from .nn import binary_layers, size_report

__all__ = ["inspect_config", "main"]


def inspect_config(config, overrides=()) -> dict:
    """Size report of the model of ``config`` (path, dict or Config), plus the model name and binary layer types."""
    cfg = load_config(config, overrides)
    model = build(cfg)
    report = size_report(model)
    report["model"] = cfg.model.name
    report["binary_weights"] = cfg.model.binary_weights
    report["binary_activations"] = cfg.model.binary_activations
    report["binary_layer_types"] = dict(Counter(type(m).__name__ for _, m in binary_layers(model)))
    return report


def _human(report: dict, config: str) -> str:
    kind = {(False, False): "32/32", (True, False): "1/32", (True, True): "1/1", (False, True): "32/1"}[
        (report["binary_weights"], report["binary_activations"])]
    types = ", ".join(f"{n} x{c}" for n, c in report["binary_layer_types"].items()) or "none"
    return "\n".join([
        f"config           {config}",
        f"model            {report['model']} (weights/activations {kind})",
        f"params           {report['params']:,} ({report['params'] / 1e6:.2f}M)",
        f"binary params    {report['binary_params']:,} in {report['binary_tensors']} tensors",
        f"binary fraction  {report['binary_fraction']:.4f}",
        f"binary layers    {types}",
        f"fp32 size        {report['fp32_mb']:.2f} MB",
        f"packed size      {report['packed_mb']:.2f} MB (binary 1 bit, rest fp32); "
        f"{report['packed_fp16_mb']:.2f} MB with fp16 rest",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbgen.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        report = inspect_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _human(report, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
