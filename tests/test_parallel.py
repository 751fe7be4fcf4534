"""Productions on a Dask cluster: the same data set as local worker processes, bit for bit, also
when a worker is killed in the middle of a shard."""

import os
import signal
import threading
import time

import pytest
import torch

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


def test_a_sharded_generation_is_the_same_on_dask_resumes_and_matches_generate(tmp_path, cluster):
    from pcshower import generate
    from pcshower.io import read_hits_parquet, read_parquet
    from pcshower.models.production import (_shard_conditions, _shard_seed,
                                            generate_production)

    kw = dict(n=5, energy=(20.0, 60.0), theta=(60.0, 90.0), shard_size=2, steps=1, seed=4,
              progress=False)
    local = generate_production(tmp_path / "local", workers=1, **kw)
    generate_production(tmp_path / "dask", scheduler=cluster[1], **kw)
    assert local["written"] == 3 and _files(tmp_path / "local") == _files(tmp_path / "dask")
    again = generate_production(tmp_path / "local", workers=1, **kw)
    assert again["written"] == 0 and again["already_done"] == 3
    with pytest.raises(ValueError, match="different run"):
        generate_production(tmp_path / "local", workers=1, **{**kw, "steps": 2})
    # shard 2 (one shower) is what generate() makes from that shard's conditions and seed
    import json
    run = json.loads((tmp_path / "local" / "_run.json").read_text())["pcshower_run"]
    energy, theta, phi = _shard_conditions(run, 2)
    direct = generate(energy, theta, "ild", phi=phi, steps=1, seed=_shard_seed(run, 2))
    showers = read_parquet(tmp_path / "local" / "showers")
    hits, _ = read_hits_parquet(tmp_path / "local" / "hits")
    assert len(showers) == len(hits) == 5
    assert torch.equal(showers[4:].points, direct.points)
    assert torch.equal(hits.energy[hits.ptr[4]:], direct.hits.energy)


def test_cli_sharded_generation_refuses_files_and_options_without_shards(tmp_path, capsys):
    from pcshower.cli import main

    assert main(["generate", "--energy", "50", "--n", "2", "--shard-size", "1",
                 "--out", str(tmp_path / "g.parquet")]) == 2
    assert "directory of shards" in capsys.readouterr().err
    assert main(["generate", "--energy", "50", "--n", "2", "--scheduler", "local",
                 "--out", str(tmp_path / "g.parquet")]) == 2
    assert "--shard-size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
