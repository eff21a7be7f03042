"""Real Ray: the loaders inside Ray Train TorchTrainer workers (1, 2, 3 workers) on a throwaway local cluster.

Per epoch the union over workers covers every row exactly once; the Ray Data path yields exactly the batches
of the pyarrow path (so the order is deterministic); a mid-epoch save/restore continues exactly; the eval
split is seen once. The cluster is ``ray start --head --block`` on 127.0.0.1 with every port explicit (other
Ray instances may share this machine), stopped by SIGTERM to that process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import test_data_convert
from ray_cluster import free_port, free_port_range
from test_data_convert import id_split, ids_of

pytestmark = pytest.mark.slow

N_TRAIN, N_EVAL, BATCH, SEED = 1000, 333, 16, 7


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # a hard dependency: a broken install must fail here, not skip

    temp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray puts unix sockets under it
    port, (base, _) = free_port(), free_port_range(200)
    ports = {
        f"--{k}": str(free_port())
        for k in [
            "dashboard-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        ]
    }
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--port={port}",
        f"--min-worker-port={base}",
        f"--max-worker-port={base + 199}",
    ] + [f"{k}={v}" for k, v in ports.items()]
    # Ray 2.6x heads turn on token auth and share ~/.ray/auth_token; this private cluster goes without.
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    head = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError, TimeoutError):
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        # The train function is defined here; ship it (and the helpers) by value to the Ray workers.
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.cloudpickle.register_pickle_by_value(test_data_convert)
        yield ray
    finally:
        ray.shutdown()
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth
        _stop_head(head)
        shutil.rmtree(temp, ignore_errors=True)


def _group_members(pgid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: process group
            out.append(int(stat.parent.name))
    return out


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to every process of the head's process group (the one we created for it). After Train runs
    the Ray processes take ~30 s to exit gracefully; whatever is left after 5 s gets SIGKILL (the cluster and
    its temp dir are thrown away anyway)."""
    os.killpg(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _group_members(head.pid) and time.monotonic() < deadline:
        head.poll()  # reap the head once it exits
        time.sleep(0.2)
    if _group_members(head.pid):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("raydata")
    return id_split(root / "train", N_TRAIN), id_split(root / "eval", N_EVAL, rows_per_shard=100)


def _train_fn(config):
    import ray.train

    from dbgen.data import EvalLoader, TrainLoader

    loader = TrainLoader(batch_size=BATCH, seed=SEED, shuffle_buffer=100)  # get_dataset_shard("train")
    rank, world = loader.rank, loader.layout.world_size
    it = iter(loader)
    batches = [next(it) for _ in range(2 * len(loader))]
    epochs = [
        np.concatenate([ids_of(x) for x in batches[e * len(loader) : (e + 1) * len(loader)]]).tolist() for e in range(2)
    ]
    # The pyarrow path in the same worker must give the very same batches.
    arrow = TrainLoader(
        loader.split, batch_size=BATCH, seed=SEED, shuffle_buffer=100, rank=rank, world_size=world, backend="arrow"
    )
    arrow_it = iter(arrow)
    same_as_arrow = all(bool((x == next(arrow_it)).all()) for x in batches)
    # Interrupt in the middle of epoch 1, restore into a new Ray-backed loader, compare.
    k = len(loader) + len(loader) // 2
    first = TrainLoader(batch_size=BATCH, seed=SEED, shuffle_buffer=100)
    first_it = iter(first)
    for _ in range(k):
        next(first_it)
    resumed = TrainLoader(batch_size=BATCH, seed=SEED, shuffle_buffer=100)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    resumed_it = iter(resumed)
    resume_exact = all(bool((next(resumed_it) == batches[i]).all()) for i in range(k, 2 * len(loader)))
    ev = EvalLoader(batch_size=50)  # get_dataset_shard("eval")
    eval_batches = [ids_of(x).tolist() for x in ev]
    out = {
        "rank": rank,
        "world": world,
        "len": len(loader),
        "epochs": epochs,
        "same_as_arrow": same_as_arrow,
        "resume_exact": resume_exact,
        "eval": eval_batches,
        "eval_len": len(ev),
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))
    ray.train.report({"done": 1})


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ray_train_workers_exactly_once(ray_cluster, splits, tmp_path, world_size):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dbgen.data import ray_data_config, ray_datasets

    train_dir, eval_dir = splits
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"out": str(tmp_path)},
        # Fractional CPUs: the workers must leave CPUs to the Ray Data read tasks on this 2-CPU machine.
        scaling_config=ScalingConfig(num_workers=world_size, resources_per_worker={"CPU": 0.25}),
        datasets=ray_datasets(train_dir, eval_dir),
        dataset_config=ray_data_config(),
        run_config=RunConfig(name=f"data-w{world_size}", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert [r["world"] for r in results] == [world_size] * world_size
    per_epoch = N_TRAIN // (BATCH * world_size)
    assert all(r["len"] == per_epoch for r in results)
    for e in range(2):
        ids = np.concatenate([r["epochs"][e] for r in results])
        assert len(ids) == per_epoch * BATCH * world_size  # drop_last: only the last partial global batch
        assert len(np.unique(ids)) == len(ids) and ids.min() >= 0 and ids.max() < N_TRAIN
    assert results[0]["epochs"][0] != results[0]["epochs"][1]  # reshuffled per epoch
    assert all(r["same_as_arrow"] for r in results)
    assert all(r["resume_exact"] for r in results)
    assert len({r["eval_len"] for r in results}) == 1
    eval_ids = np.concatenate([np.concatenate(b) for r in results for b in [r["eval"]]])
    np.testing.assert_array_equal(eval_ids, np.arange(N_EVAL))


def test_ray_backend_reads_in_planned_order(ray_cluster, tmp_path):
    """Many small read tasks (125 row groups of 8 rows): Ray Data must still deliver them in the plan's order."""
    from dbgen.data import EvalLoader, TrainLoader

    split = id_split(tmp_path, 1000, rows_per_shard=200, row_group_rows=8)
    for rank in range(2):
        kw = dict(batch_size=20, seed=3, shuffle_buffer=50, rank=rank, world_size=2)
        ray_it = iter(TrainLoader(split, backend="ray", **kw))
        arrow_it = iter(TrainLoader(split, backend="arrow", **kw))
        for _ in range(2 * 25):  # two epochs
            np.testing.assert_array_equal(ids_of(next(ray_it)), ids_of(next(arrow_it)))
    ev = np.concatenate([ids_of(x) for x in EvalLoader(split, batch_size=64, rank=0, world_size=1, backend="ray")])
    np.testing.assert_array_equal(ev, np.arange(1000))


def test_ray_backend_read_error_is_a_data_error_naming_the_shard(ray_cluster, tmp_path):
    """A shard damaged after the loader checked it fails its Ray Data read task; the loader raises that task's
    DataError itself, naming the shard (not Ray Data's UserCodeException, which a trainer would retry)."""
    from dbgen.data import DataError, EvalLoader

    split = id_split(tmp_path, 300, rows_per_shard=100)
    loader = EvalLoader(split, batch_size=64, rank=0, world_size=1, backend="ray")  # checks every sha256 here
    shard = split / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[4:68] = bytes(b ^ 0xFF for b in data[4:68])  # the first page header: cannot be parsed
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        for _ in loader:
            pass
    assert type(err.value) is DataError
    assert str(err.value).startswith(f"{shard}: cannot read row group 0: "), err.value
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
