"""A pcshower production on a batch farm (HTCondor or Slurm) through dask-jobqueue.

Run on the farm's submit node, in an environment where pcshower is installed and visible to
the batch nodes (a shared file system or the same container image), and with an output
directory every node can write (a shared file system: each shard is written there by the node
that made it)::

    pip install "pcshower[dask]" dask-jobqueue
    python examples/farm_production.py slurm --jobs 50 --queue short --out /shared/ild_g4 \\
        simulate --engine geant4 --stack ild --energy 10:100 --theta 30:90 --n 1000000
    python examples/farm_production.py htcondor --jobs 200 --out /shared/ild_gen \\
        generate --geometry ild --energy 10:100 --theta 30:90 --n 10000000

Each batch job is one Dask worker with one core (the engines and the networks run one thread a
shard); the shards are seeded by (seed, shard), so the data set does not depend on how many jobs
ran or which one made a shard, a job that dies has its shard redone elsewhere, and running the
same command again skips the shards already written. Without a farm, the same production runs
with ``pcshower simulate ... --scheduler local`` (a LocalCluster on this machine).
"""

from __future__ import annotations

import argparse


def make_cluster(kind: str, jobs: int, queue: str | None, memory: str, walltime: str):
    """A dask-jobqueue cluster of ``jobs`` single-core batch jobs."""
    import dask_jobqueue

    common = dict(cores=1, processes=1, memory=memory, walltime=walltime,
                  # one thread per worker; pcshower sets torch to one thread per shard
                  job_script_prologue=["export OMP_NUM_THREADS=1"])
    if kind == "slurm":
        cluster = dask_jobqueue.SLURMCluster(queue=queue, **common)
    else:
        # HTCondor has no queue; "+JobFlavour" is CERN's way to ask for a wall-time class
        extra = {"+JobFlavour": f'"{queue}"'} if queue else {}
        cluster = dask_jobqueue.HTCondorCluster(disk="2 GB", job_extra_directives=extra,
                                                **common)
    cluster.scale(jobs=jobs)
    print(cluster.job_script())  # what each batch job runs
    return cluster


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("farm", choices=["slurm", "htcondor"])
    p.add_argument("--jobs", type=int, default=20, help="batch jobs (Dask workers)")
    p.add_argument("--queue", default=None, help="Slurm partition / HTCondor JobFlavour")
    p.add_argument("--memory", default="4 GB", help="memory per job (Geant4 ILD: ~1 GB)")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--out", required=True, help="output directory on a shared file system")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--engine", default="geant4")
    s.add_argument("--stack", default="ild")
    s.add_argument("--energy", default="10:100")
    s.add_argument("--theta", default="30:90")
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--frame", default="both")
    g = sub.add_parser("generate")
    g.add_argument("--geometry", default="ild")
    g.add_argument("--model", default=None)
    g.add_argument("--energy", default="10:100")
    g.add_argument("--theta", default="30:90")
    g.add_argument("--n", type=int, required=True)
    args = p.parse_args(argv)

    cluster = make_cluster(args.farm, args.jobs, args.queue, args.memory, args.walltime)
    try:
        if args.what == "simulate":
            from pcshower.simulate.production import produce

            summary = produce(args.out, n=args.n, energy=args.energy, theta=args.theta,
                              stack=args.stack, frame=args.frame, engine=args.engine,
                              seed=args.seed, shard_size=args.shard_size, scheduler=cluster)
        else:
            from pcshower.models.production import generate_production

            summary = generate_production(args.out, n=args.n, energy=args.energy,
                                          theta=args.theta, geometry=args.geometry,
                                          model=args.model, seed=args.seed,
                                          shard_size=args.shard_size, scheduler=cluster)
        print(summary)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
