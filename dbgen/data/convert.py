"""``python -m dbgen.data.convert``: convert an image data set into a Parquet split (see :mod:`dbgen.data.converters`).

::

    python -m dbgen.data.convert --format FORMAT --src PATH --out DIR [--split train|test] [--resolution 32|64]
        [--rows-per-shard N] [--row-group-rows N] [--skip-bad] [--resize] [--overwrite]
    python -m dbgen.data.convert --format builtin --src photos32 [--out DIR]

``--out DIR`` is the data set's root directory: the split is written to ``DIR/<split>`` (``DIR/train`` or
``DIR/test``), so converting both splits into the same ``--out`` gives the layout the presets read
(``data.train: DIR/train``, ``data.eval: DIR/test``; ``data.train: DIR`` also works). ``--format builtin``
writes both, ``DIR/train`` and ``DIR/test``, or without ``--out`` builds into the cache (``$DBGEN_CACHE`` or
``~/.cache/dbgen``) as ``builtin("photos32")`` does. An ``--out`` that is itself a converted split is refused
(it would nest a split inside it). The Python function :func:`dbgen.data.convert` takes the split directory
itself. Exit code 1 with a message naming the file / member / row on bad input; exit code 2 with a message
naming the path when the output cannot be written there (``--out`` is a file or below one, a read-only file
system, no permission) or another file system error stops the conversion.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from .builtin import BUILTINS, build_builtin, builtin
from .converters import FORMATS, convert
from .split import MANIFEST, DataError
from .writer import DEFAULT_ROWS_PER_SHARD, RESIZE_METHOD, ROW_GROUP_ROWS, OutputError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dbgen.data.convert", description="Convert an image data set into a Parquet split."
    )
    p.add_argument("--format", required=True, choices=FORMATS + ("builtin",))
    p.add_argument("--src", required=True, help=f"input path; for --format builtin one of {', '.join(BUILTINS)}")
    p.add_argument(
        "--out",
        default=None,
        help="data set root directory: the split is written to OUT/SPLIT "
        "(builtin: OUT/train and OUT/test; default for builtin: the cache)",
    )
    p.add_argument(
        "--split",
        default="train",
        choices=("train", "test"),
        help="which split to read from --src and write to OUT/SPLIT (not for builtin: it writes both)",
    )
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    p.add_argument(
        "--row-group-rows", type=int, default=ROW_GROUP_ROWS, help="rows per Parquet row group = the loader's read unit"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip (and list in the manifest) bad images")
    p.add_argument("--resize", action="store_true", help=f"resample other sizes: {RESIZE_METHOD}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted split")
    args = p.parse_args(argv)
    if args.out is None and args.format != "builtin":
        p.error("--out is required")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.format == "builtin":
            if args.src not in BUILTINS:
                raise DataError(f"builtin data {args.src!r}: expected one of {', '.join(BUILTINS)}")
            if args.out is None:
                paths = builtin(args.src)
            else:
                paths = build_builtin(args.src, Path(args.out), overwrite=args.overwrite)
            for name, path in paths.items():
                print(f"{name}: {path}")
            return 0
        root = Path(args.out).expanduser()
        if (root / MANIFEST).exists():
            raise DataError(
                f"--out {args.out}: is itself a converted split; --out takes the data set root "
                f"(the split is written to <out>/{args.split})"
            )
        out = convert(
            args.format,
            args.src,
            root / args.split,
            split=args.split,
            resolution=args.resolution,
            rows_per_shard=args.rows_per_shard,
            row_group_rows=args.row_group_rows,
            skip_bad=args.skip_bad,
            resize=args.resize,
            overwrite=args.overwrite,
        )
    except (OutputError, OSError) as e:  # where the split goes, not what is in the input: exit 2 like a bad path
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = json.loads((out / MANIFEST).read_text())
    print(f"{out}: {m['num_rows']} rows in {len(m['shards'])} shards, {m['num_skipped']} skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
