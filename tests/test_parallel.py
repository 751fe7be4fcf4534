"""Productions on a Dask cluster: the same data set as local worker processes, bit for bit, also
when a worker is killed in the middle of a shard."""

import os
import signal
import threading
import time

import pytest

from pcshower.parallel import check_scheduler, map_unordered
from pcshower.simulate.production import produce

distributed = pytest.importorskip("distributed")

SPEC = "20x[W:2.1,Si:0.5:active]+10x[W:4.2,Si:0.5:active]"


def _produce(out, **kw):
    args = dict(n=6, energy=(5.0, 20.0), theta=(0.0, 30.0), stack=SPEC, shard_size=2, seed=11,
                progress=False, grid="coarse")
    args.update(kw)
    return produce(out, **args)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


@pytest.fixture
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as c:
        with distributed.Client(c) as client:
            yield c, client


def test_scheduler_names_are_checked():
    assert check_scheduler(None) == "processes"
    assert check_scheduler("local") == "local"
    assert check_scheduler("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"
    with pytest.raises(ValueError, match="tcp://"):
        check_scheduler("slurm")
    with pytest.raises(ValueError, match="--workers"):
        _produce("unused", workers=0)


def test_map_unordered_runs_every_job_once_on_each_executor(cluster):
    _, client = cluster
    for scheduler in ("processes", client):
        assert sorted(map_unordered(abs, range(-3, 3), scheduler=scheduler, workers=2)) == \
            [0, 1, 1, 2, 2, 3]


def test_a_dask_production_equals_the_local_one_bit_for_bit(tmp_path, cluster):
    c, _ = cluster
    local = _produce(tmp_path / "processes", workers=2, frame="both")
    dask = _produce(tmp_path / "dask", scheduler=c.scheduler_address, frame="both")
    assert local["written"] == dask["written"] == 3
    a, b = _files(tmp_path / "processes"), _files(tmp_path / "dask")
    assert len(a) == 6 and a == b


def test_a_worker_killed_mid_shard_leaves_no_file_and_the_result_is_unchanged(tmp_path, cluster):
    _, client = cluster
    # shards long enough (~1 s each on one core) that the kill lands inside one
    kw = dict(n=450, shard_size=150, energy=(80.0, 100.0))
    reference = tmp_path / "reference"
    _produce(reference, workers=1, **kw)
    out = tmp_path / "killed"
    result = {}
    run = threading.Thread(target=lambda: result.update(_produce(out, scheduler=client, **kw)))
    run.start()
    pids = client.run(os.getpid)  # worker address -> process id
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        busy = [w for w, tasks in client.processing().items() if tasks]
        victim = busy[0] if busy else None
        time.sleep(0.05)
    assert victim is not None, "no shard started on the cluster"
    time.sleep(0.3)
    done_at_kill = {p.name for p in out.glob("shard-*.parquet")}
    assert client.processing()[victim], "the shard ended before the kill; make shards longer"
    os.kill(pids[victim], signal.SIGKILL)
    run.join(timeout=300)
    assert not run.is_alive() and result["written"] == 3
    assert len(done_at_kill) < 3  # the kill came before the run was over
    assert pids[victim] not in client.run(os.getpid).values()  # that process is gone
    assert _files(out) == _files(reference)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
