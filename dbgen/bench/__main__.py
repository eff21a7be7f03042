"""``python -m dbgen.bench SUBCOMMAND``: each subcommand is a module here with ``add_arguments`` and ``main``."""

import argparse
import importlib
import logging
import sys

from ..config import ConfigError
from ..data import DataError

SUBCOMMANDS = {
    "train": "training-step throughput and memory of a model config",
    "data": "data pipeline throughput (raw Arrow reader and Ray Data) and peak RSS",
    "comm": "bytes on the wire and step time per communication mode",
    "overlap": "compute-only, serial and overlapped step per communication mode, and plain DDP, on one link",
    "sample": "sampling throughput and peak memory of the packed and float engines",
    "scale": "a ~300M binary RVAE on 2 CPU workers, dp vs packed: peak memory and bytes/step vs the planner",
    "kernels": "the packed ops on the CPU (reference and each instruction-set path) against the float conv",
}


def parse(argv: list[str]) -> argparse.Namespace:
    """The subcommand's own parser takes the rest of the line with ``parse_intermixed_args``, so that
    ``key=value`` overrides may stand before, between and after the flags (argparse's intermixed parsing does
    not support subparsers, hence one parser per subcommand, chosen by the first word)."""
    if argv and argv[0] in SUBCOMMANDS:
        name = argv[0]
        module = importlib.import_module(f"dbgen.bench.{name}")
        p = argparse.ArgumentParser(prog=f"python -m dbgen.bench {name}", description=SUBCOMMANDS[name])
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
        return p.parse_intermixed_args(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m dbgen.bench")  # --help, or a missing/unknown subcommand
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    parser.parse_args(argv)  # exits with argparse's usage message
    raise AssertionError("unreachable: argparse exits on a missing or unknown subcommand")


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args._main(args)
    except (ConfigError, DataError) as e:  # a bad config or data path: one line naming it, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
