"""Check converted splits: ``python -m dbgen.data.verify DIR [DIR ...]``.

Validates each manifest, re-hashes every shard against its sha256 and checks the Parquet schema and
row groups. Exit code 1 and a message naming the file at the first problem.
"""

import argparse
import sys

from .split import DataError, verify_split


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbgen.data.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="split directories (manifest.json + shards)")
    args = p.parse_args(argv)
    for d in args.dirs:
        try:
            split = verify_split(d)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(
            f"{split.path}: ok, {split.num_rows} rows in {len(split.shards)} shards, "
            f"{split.resolution}x{split.resolution}x{split.channels}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
