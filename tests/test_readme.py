"""Every command of the README and docs/ is run here or named here with the reason it is not: the README's Data,
"Training on one machine" and "Evaluate, sample, export" sections work as written, run in the order a user
would, on tiny inputs, and so do the cheap commands of docs/; the others (a cloud cluster, a long-running
server, root, minutes of CPU) are listed in :data:`NOT_RUN` with the test that covers them instead.

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
from limits import patience  # noqa: E402
from test_data_convert import tar_dir, write_cifar_dir, write_image_folder, write_imagenet  # noqa: E402

from dbgen.config import load_config  # noqa: E402
from dbgen.data import resolve_split  # noqa: E402
from dbgen.export import MAGIC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RUN_SECTIONS = ("Data", "Training on one machine", "Evaluate, sample, export")  # README sections run below
CHEAP_DOCS = ("python -m dbgen.inspect --config configs/rvae_cifar10_binary.yaml --link-gbps",)  # run: seconds

_CLUSTER = (
    "needs a cloud account and GPUs: tests/test_train_cluster.py submits the same dbgen.train job with ray job "
    "submit to a throwaway head, and tests/test_cluster_files.py checks the cluster configs"
)
_LOCAL_JOB = "tests/test_train_cluster.py::test_ray_job_submit_end_to_end submits this job to a throwaway head"
_NETNS = "root and minutes: tests/test_netns_cluster.py runs this two-namespace cluster and dbgen.bench comm on it"
# Commands (by their start) of the README and docs/ that this test does not run, and why.
NOT_RUN = {
    "bash scripts/setup.sh": ".ci/run runs it on a fresh machine before the suite, which runs in the .venv it made",
    "source .venv/bin/activate": "changes the calling shell only; the commands here run with .venv's interpreter",
    "bash scripts/demo.sh": "4 minutes of training on 2 cores; its driver, sample and evaluate run here on tiny inputs",
    "ray up ": _CLUSTER,
    "ray dashboard ": _CLUSTER,
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=": _CLUSTER,
    "ray rsync-up ": _CLUSTER,
    "ray exec ": _CLUSTER,
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m dbgen.train": _CLUSTER,
    "ray down ": _CLUSTER,
    "prometheus --config.file=cluster/prometheus.yml": (
        "a server that runs until stopped: tests/test_monitoring_prometheus.py runs Prometheus with this file's "
        "service discovery against a throwaway Ray head and a training job"
    ),
    "bash cluster/local_head.sh &": _LOCAL_JOB,
    "RAY_AUTH_MODE=token ray job submit": _LOCAL_JOB,
    "kill %1": _LOCAL_JOB,
    "DIR=$(bash benchmarks/netns_cluster.sh up": _NETNS,
    "bash benchmarks/netns_cluster.sh ": _NETNS,
    "python -m dbgen.bench scale": "minutes on 2 cores: tests/test_scale_check.py runs it (--small)",
    "python -m dbgen.inspect --config configs/rvae_cifar10_wide_binary.yaml --memory": (
        "minutes: it measures a step of the 755M model on the CPU; tests/test_memory_planner.py runs the planner "
        "on a smaller model against measured peaks"
    ),
    "bash scripts/test.sh": "the test suite itself",
}
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
def bash_lines(path: Path, section: str | None = None) -> list[tuple[str, str]]:
    """``(section, command line)`` of every line of the ```bash blocks of ``path`` (continuations joined, comments
    kept); ``section``: only that ``## section``'s own text (up to its first ``###`` or the next ``##``)."""
    text = path.read_text()
    found = []
    for m in re.finditer(r"^## ([^\n]+)\n(.*?)(?=^##|\Z)", text, flags=re.M | re.S):
        if section is not None and m.group(1) != section:
            continue
        for block in re.findall(r"^```bash\n(.*?)^```", m.group(2), flags=re.M | re.S):
            found += [(m.group(1), line.strip()) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    if path.parent.name == "docs":  # a docs page: its text before the first ## counts too
        head = text.split("\n## ", 1)[0]
        for block in re.findall(r"^```bash\n(.*?)^```", head, flags=re.M | re.S):
            found += [("", line.strip()) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return found


def readme_commands(section: str) -> list[list[str]]:
    """Tokens of every ``python -m dbgen...`` line in the ```bash blocks of the README's ``## section``."""
    assert re.search(rf"^## {re.escape(section)}\n", README.read_text(), flags=re.M), f"README.md has no '## {section}'"
    cmds = []
    for _, line in bash_lines(README, section):
        tokens = shlex.split(line, comments=True)
        if tokens[:2] == ["python", "-m"] and tokens[2].startswith("dbgen."):
            cmds.append(tokens)
    assert cmds, f"no python -m dbgen commands in README.md's '## {section}'"
    return cmds


def test_every_command_of_the_readme_and_docs_is_run_or_named():
    """A command added to the README or docs/ must run in this file or be named in NOT_RUN with a reason."""
    unhandled, used = [], set()
    for path in [README, *DOCS]:
        for section, line in bash_lines(path):
            if path == README and section in RUN_SECTIONS and line.startswith("python -m dbgen."):
                continue
            if path != README and line.startswith(CHEAP_DOCS):
                continue
            reasons = [start for start in NOT_RUN if line.startswith(start)]
            if not reasons:
                unhandled.append(f"{path.relative_to(ROOT)} ({section or 'top'}): {line}")
            used.update(reasons)
    assert not unhandled, "commands neither run nor named in NOT_RUN:\n" + "\n".join(unhandled)
    assert used == set(NOT_RUN), f"NOT_RUN names commands no page shows: {set(NOT_RUN) - used}"
    assert len(README.read_text().splitlines()) <= 250  # the README stays short; details go to docs/


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
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=patience(timeout))
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

    # ---- ## Training on one machine
    train = pick(readme_commands("Training on one machine"), "dbgen.train")
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

    # ---- ## Evaluate, sample, export: the run, then its packed artifact
    inference = readme_commands("Evaluate, sample, export")
    run_values = {"--run": "runs/readme", "--data": "data/cifar10/test"}
    r = run(
        expand(
            pick(inference, "dbgen.evaluate", "--run"),
            values=run_values,
            optional={"--data DIR": ["--data", "data/cifar10/test"], "--samples K": [], "--json": ["--json"]},
        ),
        cwd,
    )
    ev_run = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev_run["rows"] == CIFAR_PER_BATCH and ev_run["step"] == STEPS, ev_run
    assert math.isfinite(ev_run["bpd"]) and 0 < ev_run["bpd"] < 12, ev_run
    assert abs(ev_run["bpd"] - summary["final_eval_bpd"]) < RUN_EVAL_BPD_TOL, (ev_run, summary["final_eval_bpd"])
    sample_run = pick(inference, "dbgen.sample", "--run")
    run(expand(sample_run, values=run_values), cwd)
    n = int(sample_run[sample_run.index("--n") + 1])
    check_png(cwd / sample_run[sample_run.index("--out") + 1], n)

    export = pick(inference, "dbgen.export")
    run(expand(export, values=run_values), cwd)
    artifact = cwd / export[export.index("--out") + 1]
    assert artifact.is_file() and artifact.read_bytes().startswith(MAGIC)
    evaluate_packed = pick(inference, "dbgen.evaluate", "--packed")
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
    sample_packed = pick(inference, "dbgen.sample", "--packed")
    out = cwd / sample_packed[sample_packed.index("--out") + 1]
    out.unlink(missing_ok=True)  # the README writes grid.png again: make sure this command wrote it
    run(expand(sample_packed, values=run_values), cwd)
    check_png(out, int(sample_packed[sample_packed.index("--n") + 1]))


def test_cheap_docs_commands_work_as_written(tmp_path):
    """The docs/ commands that take seconds (:data:`CHEAP_DOCS`) run as written, every optional group taken."""
    ran = []
    for path in DOCS:
        for _, line in bash_lines(path):
            if not line.startswith(CHEAP_DOCS):
                continue
            tokens = shlex.split(line, comments=True)
            groups = {g: g.split() for g in re.findall(r"\[([^\]]+)\]", line)}
            r = run(expand(tokens, optional=groups), ROOT)  # the configs/ paths are the checkout's
            ran.append((path.name, r.stdout))
    assert ran, "no cheap docs/ command found"
    for name, out in ran:
        if name == "communication.md":  # the link model: every mode's bytes and the rate it needs, per worker
            rows = re.findall(r"^(dp|zero1|packed|packed_onebit) +([0-9.]+) ", out, flags=re.M)
            assert [mode for mode, _ in rows] == ["dp", "zero1", "packed", "packed_onebit"], out[-2000:]
            megabytes = dict(rows)
            assert float(megabytes["packed_onebit"]) < float(megabytes["packed"]) < float(megabytes["dp"]), out
