"""Every command of the README's Data, Training and "Communication modes and packed models" sections works as
written, run in the order a user would, on tiny inputs.

The command lines are read out of the sections' ```bash blocks (a README edit that changes a command changes
what runs here, and an unknown placeholder or optional flag fails the test until it is handled below). Each runs
as its own ``python -m`` subprocess in a temporary directory, so the relative paths (``data/cifar10``,
``runs``, ``model.dbgen``, ``grid.png``) land there. Substitutions, and nothing else:

* placeholders: ``--run DIR`` -> the run directory, ``--data DIR`` -> the converted CIFAR-10 test split,
  ``--storage DIR`` -> ``runs``, ``--name RUN`` -> ``readme``;
* optional ``[...]`` groups are either taken (``--json``, ``--resize``, ``--skip-bad``, ``--name``,
  ``--storage``, ``key=value ...``, ``--workers 4``: run without and with it) or dropped (``--samples K``: the
  evaluations are compared; ``--takeover``: a new run holds no lease);
* the training preset (``configs/rvae_cifar10_binary.yaml``, the paper model: hours on a CPU) becomes the tiny
  ``configs/rvae_binary_tiny.yaml`` with the preset's own ``data.train``/``data.eval`` paths and a few steps;
* the inputs (``cifar-10-python.tar.gz``, ``Imagenet32_*_npz``, ``train.tar``) are fabricated in the official
  layouts with a few rows each.
"""

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_data_convert import tar_dir, write_cifar_dir, write_image_folder, write_imagenet  # noqa: E402

from dbgen.config import load_config  # noqa: E402
from dbgen.data import resolve_split  # noqa: E402
from dbgen.export import MAGIC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY = ROOT / "configs" / "rvae_binary_tiny.yaml"
CIFAR_PER_BATCH = 64  # rows per CIFAR-10 batch file: 5 x 64 train rows, 64 test rows
STEPS = 10
FAST = [
    f"train.max_steps={STEPS}",
    "train.batch_size=16",
    "train.eval_batches=1",
    "train.num_samples=4",
    "train.log_every=5",
    "scale.num_workers=1",
]
# The packed artifact stores every non-binary parameter as fp16 (binary layers bit-exact): with the same data,
# batch size and seed the two ELBOs differ only by that rounding (relative 2^-11 per parameter), which moves
# the tiny model's bits/dim by ~1e-5; tests/test_export.py bounds the same comparison by 1e-3, as here.
PACKED_BPD_TOL = 1e-3
# evaluate --run vs the run's own final eval: same weights and rows, only the posterior noise differs (another
# seed); averaged over 64 x 3072 dims it moves bits/dim by ~1e-4.
RUN_EVAL_BPD_TOL = 2e-2
# evaluate --packed --workers 4: shard i's posterior noise comes from its own seed, so this is the same kind of
# difference as RUN_EVAL_BPD_TOL (another noise draw over the same 64 rows), plus the fp16 rounding above.
ACTORS_BPD_TOL = RUN_EVAL_BPD_TOL + PACKED_BPD_TOL


# ------------------------------------------------------------------------------------------- the README
def readme_commands(section: str) -> list[list[str]]:
    """Tokens of every ``python -m dbgen...`` line in the ```bash blocks of ``## section``, in order; only the
    section's own text counts (up to its first ``###`` subsection or the next ``##``)."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^##)", text, flags=re.M | re.S)
    assert m, f"README.md has no '## {section}' section"
    cmds = []
    for block in re.findall(r"^```bash\n(.*?)^```", m.group(1), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens[:2] == ["python", "-m"] and tokens[2].startswith("dbgen."):
                cmds.append(tokens)
    assert cmds, f"no python -m dbgen commands in README.md's '## {section}'"
    return cmds


def expand(
    tokens: list[str], *, values: dict[str, str] | None = None, optional: dict[str, list[str]] | None = None
) -> list[str]:
    """A README command as argv: ``python`` -> this interpreter; every ``[...]`` group replaced by
    ``optional[group text]`` (an empty list drops it); the value after each flag in ``values`` replaced. An
    unhandled group or a leftover placeholder (an all-caps word such as DIR) fails the test."""
    values, optional = values or {}, optional or {}
    out, i = [sys.executable], 1
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("["):
            j = i
            while not tokens[j].endswith("]"):
                j += 1
            group = " ".join(tokens[i : j + 1])[1:-1]
            assert group in optional, f"README command {shlex.join(tokens)!r}: optional [{group}] not handled"
            out += optional[group]
            i = j + 1
        elif tok in values:
            out += [tok, values[tok]]
            i += 2
        else:
            out.append(tok)
            i += 1
    leftover = [t for t in out if re.fullmatch(r"[A-Z]{1,8}", t)]
    assert not leftover, f"README command {shlex.join(tokens)!r}: placeholder(s) {leftover} not substituted"
    return out


def pick(cmds: list[list[str]], module: str, *words: str) -> list[str]:
    """The one command of ``module`` that holds all ``words`` as tokens."""
    found = [c for c in cmds if c[2] == module and all(w in c for w in words)]
    assert len(found) == 1, f"README: expected one 'python -m {module} ... {' '.join(words)}', found {found}"
    return found[0]


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(argv[1:])} -> rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def manifest(split: Path) -> dict:
    return json.loads((split / "manifest.json").read_text())


def grid_size(n: int) -> tuple[int, int]:
    """Size of dbgen.sample's grid of n 32x32 images: ceil(sqrt(n)) columns, 2-pixel gaps."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * 34 - 2, rows * 34 - 2


def check_png(path: Path, n: int) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == grid_size(n), (im.format, im.mode, im.size)
        assert np.asarray(im).std() > 0  # not a blank canvas


# ------------------------------------------------------------------------------------------ the inputs
def fabricate_inputs(cwd: Path) -> None:
    """The README's inputs in their official layouts, a few rows each."""
    write_cifar_dir(cwd / "cifar_src", n=CIFAR_PER_BATCH)  # cifar-10-batches-py/{data_batch_1..5,test_batch,...}
    tar_dir(cwd / "cifar_src", cwd / "cifar-10-python.tar.gz", "w:gz")
    write_imagenet(cwd / "Imagenet32_train_npz", {"train_data_batch_1": 20, "train_data_batch_2": 12})
    write_imagenet(cwd / "Imagenet32_val_npz", {"val_data": 8}, seed=1)
    write_image_folder(cwd / "tar_src", per_class=3)  # 9 images of 32x32 in 3 class folders
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(cwd / "tar_src" / "cat" / "big.png")
    (cwd / "tar_src" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    tar_dir(cwd / "tar_src", cwd / "train.tar")


# -------------------------------------------------------------------------------------------- the test
@pytest.mark.slow
@pytest.mark.timeout(900)  # cold: DeepSpeed's comm op is compiled once per session (~1-2 min on 2 cores)
def test_readme_commands_work_as_written(tmp_path):
    cwd = tmp_path
    fabricate_inputs(cwd)

    # ---- ## Data: every command, in order
    data = readme_commands("Data")
    for cmd in data:
        run(expand(cmd, optional={"--resize": ["--resize"], "--skip-bad": ["--skip-bad"]}), cwd)
    for must in [("cifar10", "--split", "train"), ("cifar10", "--split", "test"), ("image-tar",), ("builtin",)]:
        pick(data, "dbgen.data.convert", *must)
    pick(data, "dbgen.data.verify", "data/cifar10/train")
    expected_rows = {
        "cifar10/train": 5 * CIFAR_PER_BATCH,
        "cifar10/test": CIFAR_PER_BATCH,
        "imagenet32/train": 32,
        "imagenet32/test": 8,
        "mydata/train": 10,
        "photos32/train": 39540,
        "photos32/test": 3561,
    }
    for split, rows in expected_rows.items():  # --out is the data set root: the split is <out>/<split>
        m = manifest(cwd / "data" / split)
        assert m["num_rows"] == rows, (split, m["num_rows"])
    skipped = manifest(cwd / "data" / "mydata" / "train")["skipped"]
    assert [s["source"] for s in skipped] == ["dog/broken.png"]  # --skip-bad; cat/big.png was --resize'd
    assert not (cwd / "data" / "cifar10" / "manifest.json").exists()

    # ---- ## Training: train, evaluate, sample
    training = readme_commands("Training")
    train = pick(training, "dbgen.train")
    preset = train[train.index("--config") + 1]
    preset_cfg = load_config(ROOT / preset)  # the paths the README's preset reads are the ones converted above
    assert (preset_cfg.data.train, preset_cfg.data.eval) == ("data/cifar10/train", "data/cifar10/test")
    for spec, split, want in [
        (preset_cfg.data.train, "train", "cifar10/train"),
        (preset_cfg.data.eval, "test", "cifar10/test"),
    ]:
        assert resolve_split(cwd / spec, split) == (cwd / "data" / want).resolve()
    data_overrides = [f"data.train={preset_cfg.data.train}", f"data.eval={preset_cfg.data.eval}"]
    run(
        expand(
            train,
            values={"--config": str(TINY)},
            optional={
                "key=value ...": data_overrides + FAST,
                "--name RUN": ["--name", "readme"],
                "--storage DIR": ["--storage", "runs"],
                "--takeover": [],  # a new run: no lease to take over (tests/test_train_integrity.py takes one)
            },
        ),
        cwd,
        timeout=840,
    )
    run_dir = cwd / "runs" / "readme"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 0, summary
    assert math.isfinite(summary["final_eval_bpd"]) and summary["eval_rows"] == CIFAR_PER_BATCH, summary
    assert (run_dir / f"checkpoint_{STEPS:07d}").is_dir()
    check_png(run_dir / "samples" / f"step_{STEPS:07d}.png", 4)

    run_values = {"--run": "runs/readme", "--data": "data/cifar10/test"}
    r = run(
        expand(
            pick(training, "dbgen.evaluate", "--run"),
            values=run_values,
            optional={"--data DIR": ["--data", "data/cifar10/test"], "--samples K": [], "--json": ["--json"]},
        ),
        cwd,
    )
    ev_run = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev_run["rows"] == CIFAR_PER_BATCH and ev_run["step"] == STEPS, ev_run
    assert math.isfinite(ev_run["bpd"]) and 0 < ev_run["bpd"] < 12, ev_run
    assert abs(ev_run["bpd"] - summary["final_eval_bpd"]) < RUN_EVAL_BPD_TOL, (ev_run, summary["final_eval_bpd"])
    sample_run = pick(training, "dbgen.sample", "--run")
    run(expand(sample_run, values=run_values), cwd)
    n = int(sample_run[sample_run.index("--n") + 1])
    check_png(cwd / sample_run[sample_run.index("--out") + 1], n)

    # ---- ## Communication modes and packed models: export, evaluate and sample the artifact
    packed = readme_commands("Communication modes and packed models")
    export = pick(packed, "dbgen.export")
    run(expand(export, values=run_values), cwd)
    artifact = cwd / export[export.index("--out") + 1]
    assert artifact.is_file() and artifact.read_bytes().startswith(MAGIC)
    evaluate_packed = pick(packed, "dbgen.evaluate", "--packed")
    for workers in ([], ["--workers", "4"]):  # in this process, then 4 Ray actors (more than this host's CPUs)
        r = run(expand(evaluate_packed, values=run_values, optional={"--workers 4": workers}), cwd)
        m = re.match(r"([0-9.]+) bits/dim \(ELBO\) on (\d+) rows", r.stdout.strip().splitlines()[-1])
        assert m, r.stdout
        bpd_packed, rows = float(m.group(1)), int(m.group(2))  # printed with 4 decimals
        assert rows == CIFAR_PER_BATCH
        # One process: the same latent noise as the --run evaluation, so only the fp16 rounding differs. Actors
        # draw each shard's noise from its own seed: then the ELBO's sampling noise on 64 rows dominates.
        tol = PACKED_BPD_TOL if not workers else ACTORS_BPD_TOL
        assert abs(bpd_packed - ev_run["bpd"]) < tol, (workers, bpd_packed, ev_run["bpd"])
    sample_packed = pick(packed, "dbgen.sample", "--packed")
    out = cwd / sample_packed[sample_packed.index("--out") + 1]
    out.unlink(missing_ok=True)  # the README writes grid.png again: make sure this command wrote it
    run(expand(sample_packed, values=run_values), cwd)
    check_png(out, int(sample_packed[sample_packed.index("--n") + 1]))
