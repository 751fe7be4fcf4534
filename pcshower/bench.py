"""``pcshower bench``: time per shower of the generation pipeline, stage by stage, and of the
reference simulator on the same machine, written as JSON, a Markdown table and a scaling plot.

Stages: ``shape`` (ShowerFlow samples the global shape), ``points`` (the diffusion sampler
with N steps), ``calibration`` (points rescaled to the sampled shape, then the model's sub-voxel
split), ``projection`` (placement
and cells of the geometry). Each configuration is warmed up once and timed ``repeats`` times;
the median is reported. On CUDA every timing is bracketed by ``torch.cuda.synchronize()``.
The shape, calibration and projection stages are timed on their own; the points stage is the
median of ``model.sample(calibrate=False)`` less the shape stage it contains. Beside the sum of
the stages, ``pcshower.generate`` is timed end to end (it adds batching and the conversion of
points to the detector frame), which is the number a user sees.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pcshower.units import resolve_device

__all__ = ["register", "run_benchmark", "time_call", "markdown_table", "plot_scaling"]

DEFAULT_STEPS = (1, 2, 8, 25)
DEFAULT_BATCH_SIZES = (1, 16, 256, 4096, 16384)
DEFAULT_ENERGIES = (10.0, 50.0, 90.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_host_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU"


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _bench_one(model, geometry, energy: float, theta: float, steps: int, batch: int,
               device: torch.device, repeats: int, dtype: str) -> dict:
    from pcshower.models.generate import generate

    e = torch.full((batch,), energy, dtype=torch.float64)
    th = torch.full((batch,), theta, dtype=torch.float64)
    ph = torch.zeros(batch, dtype=torch.float64)

    def shape():
        # sample() draws the shape first from the same generator, so this is its shape stage
        gen = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad(), _autocast(device, dtype):
            return model.sample_shape(model.condition(e, th, ph), gen)

    def raw():
        gen = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad(), _autocast(device, dtype):
            return model.sample(e, th, ph, steps=steps, generator=gen, calibrate=False)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    uncalibrated, shape_sample = raw(), shape()
    calibrate = lambda: model.postprocess(uncalibrated.points, uncalibrated.ptr, shape_sample,  # noqa: E731
                                          torch.Generator(device=device).manual_seed(3))
    points, ptr = calibrate()
    showers = uncalibrated._replace(points=points, ptr=ptr)
    t_shape = time_call(shape, device, repeats)
    t_raw = time_call(raw, device, repeats)
    t_cal = time_call(calibrate, device, repeats)
    row = {"energy_gev": energy, "steps": steps, "batch": batch,
           "objective": model.objective.name, "sampler": model.config["sampler"],
           "network_calls": model.network_calls(steps),
           "points_per_shower": float(showers.num_points.float().mean()),
           "network_points_per_shower": float(uncalibrated.num_points.float().mean()),
           "shape_ms": 1e3 * t_shape / batch,
           "points_ms": 1e3 * max(t_raw - t_shape, 0.0) / batch,
           "calibration_ms": 1e3 * t_cal / batch}
    total = max(t_raw, t_shape) + t_cal
    if geometry is not None:
        gen = torch.Generator(device=device).manual_seed(2)
        t_proj = time_call(lambda: geometry.project(showers, generator=gen), device, repeats)
        row["projection_ms"] = 1e3 * t_proj / batch
        total += t_proj
    row["total_ms"] = 1e3 * total / batch
    # timing only: a model without a training record (e.g. an untrained one) is timed too
    def end_to_end():
        with _autocast(device, dtype):  # the dtype the stages above ran in
            generate(energy, math.degrees(theta), geometry=geometry, n=batch, steps=steps,
                     seed=1, device=device, model=model, batch_size=batch,
                     allow_extrapolation=True)

    t_e2e = time_call(end_to_end, device, repeats)
    row["end_to_end_ms"] = 1e3 * t_e2e / batch
    row["peak_device_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20
                              if device.type == "cuda" else None)
    row["peak_host_mib"] = _peak_host_mib()
    return row


def report_json(result: dict, path=None) -> None:
    """Print ``result`` as JSON and, with ``path``, write it there too (folders made): the raw
    numbers a benchmark script leaves beside docs/."""
    text = json.dumps(result, indent=1)
    print(text)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def time_reference_simulator(energies, theta: float, n: int, stack: str = "ild",
                             repeats: int = 3, engine: str = "parametrised") -> list[dict]:
    """Milliseconds per shower of one of the project's engines (``parametrised`` or
    ``geant4``; detector frame, with its point reduction), on the current thread setting;
    ``theta`` is the global polar angle [rad] that the geometry ``stack`` converts to its local
    incidence. Geant4 is timed after one untimed shower (its geometry and tables are built on
    first use, once per process)."""
    from pcshower.simulate import simulate

    rows = []
    if engine == "geant4":
        simulate(1, float(energies[0]), theta, 0.0, stack=stack, frame="detector", seed=2,
                 engine=engine)
    for energy in energies:
        seconds = time_call(lambda: simulate(n, energy, theta, 0.0, stack=stack, frame="detector",
                                             seed=3, engine=engine), torch.device("cpu"),
                            repeats, warmup=0 if engine == "geant4" else 1)
        rows.append({"engine": engine, "energy_gev": float(energy), "n": n,
                     "ms_per_shower": 1e3 * seconds / n})
    return rows


def ratios(result: dict) -> list[dict]:
    """Each engine's time per shower over ``generate()``'s, same energy and thread setting, same
    run: how many times faster the model is than the engine (below 1: slower)."""
    out = []
    for run in result["runs"]:
        for ref in result["reference"]:
            if ref["energy_gev"] == run["energy_gev"] and ref.get("threads") == run.get("threads"):
                out.append({"threads": run.get("threads"), "energy_gev": run["energy_gev"],
                            "steps": run["steps"], "batch": run["batch"],
                            "engine": ref.get("engine", "parametrised"),
                            "engine_ms": ref["ms_per_shower"], "generate_ms": run["end_to_end_ms"],
                            "speed_up": ref["ms_per_shower"] / run["end_to_end_ms"]})
    return out


def run_benchmark(*, model=None, geometry: str | None = "ild", device=None,
                  threads=(1, None), steps=DEFAULT_STEPS, batch_sizes=DEFAULT_BATCH_SIZES,
                  energies=DEFAULT_ENERGIES, theta_deg: float = 90.0, repeats: int = 3,
                  budget_s: float = 30.0, dtype: str = "float32", reference_n: int = 200,
                  progress: bool = True, against=("parametrised",),
                  geant4_n: int = 10) -> dict:
    """Time the pipeline over steps × batch sizes × energies for each thread setting.

    A configuration whose predicted time (per-shower time of the previous batch size × batch ×
    (repeats + 1) × 3 timed calls) exceeds ``budget_s`` is skipped and listed as skipped, so a
    CPU sweep stays bounded. ``threads=None`` means all cores. ``against``: the project's
    engines timed in the same run on the same showers' conditions (``reference_n`` showers for
    the parametrised engine, ``geant4_n`` for Geant4), reported with the ratios (:func:`ratios`).
    """
    from tqdm.auto import tqdm

    from pcshower.geometry import load_geometry
    from pcshower.models.generate import resolve_model

    from pcshower.simulate.api import get_engine

    against = tuple(against or ())
    for engine in against:
        get_engine(engine)  # a clear error now if it is unknown or cannot load (geant4 extra)
    device = resolve_device(device)
    net = resolve_model(model, device).eval()
    geom = load_geometry(geometry) if isinstance(geometry, str) else geometry
    theta = math.radians(theta_deg)
    thread_settings = [t for t in threads] if device.type == "cpu" else [None]
    result = {"device": _device_name(device), "device_type": device.type, "dtype": dtype,
              "torch": torch.__version__, "cores": torch.get_num_threads(),
              "theta_deg": theta_deg, "geometry": getattr(geom, "name", None),
              "model": (getattr(net, "checkpoint_info", {}) or {}).get("path", "in-memory"),
              "repeats": repeats, "budget_s": budget_s, "runs": [], "skipped": [],
              "reference": []}
    all_threads = torch.get_num_threads()
    configs = [(t, e, s, b) for t in thread_settings for e in energies for s in steps
               for b in sorted(batch_sizes)]
    last_per_shower: dict[tuple, float] = {}
    for t, energy, n_steps, batch in tqdm(configs, disable=not progress, desc="bench", unit="cfg"):
        n_threads = all_threads if t is None else int(t)
        torch.set_num_threads(n_threads)
        key = (n_threads, energy, n_steps)
        predicted = last_per_shower.get(key, 0.0) * batch * (repeats + 1) * 3
        if predicted > budget_s:
            result["skipped"].append({"threads": n_threads, "energy_gev": energy, "steps": n_steps,
                                      "batch": batch, "predicted_s": predicted})
            continue
        row = _bench_one(net, geom, float(energy), theta, int(n_steps), int(batch), device,
                         repeats, dtype)
        row["threads"] = n_threads if device.type == "cpu" else None
        result["runs"].append(row)
        last_per_shower[key] = (row["total_ms"] + row["end_to_end_ms"]) / 1e3
    if reference_n and device.type == "cpu":
        for t in thread_settings:
            n_threads = all_threads if t is None else int(t)
            torch.set_num_threads(n_threads)
            for engine in against:
                n = reference_n if engine == "parametrised" else geant4_n
                for row in time_reference_simulator(energies, theta=theta, n=n,
                                                    stack=getattr(geom, "name", None) or "ild",
                                                    repeats=repeats if engine == "parametrised"
                                                    else 1, engine=engine):
                    row["threads"] = n_threads
                    result["reference"].append(row)
    elif against and reference_n:
        import warnings
        warnings.warn(f"--against {','.join(against)}: the engines run on CPU and are timed only "
                      f"in a CPU run (this one is on {device.type}); no ratios", stacklevel=2)
    torch.set_num_threads(all_threads)
    result["ratios"] = ratios(result)
    return result


def markdown_table(result: dict) -> str:
    """The results as Markdown: one row per configuration, and the reference simulator."""
    lines = [f"Device: {result['device']} ({result['device_type']}, {result['dtype']}), "
             f"torch {result['torch']}, geometry {result['geometry']}, theta {result['theta_deg']} deg, "
             f"median of {result['repeats']} after a warm-up.", "",
             "| threads | E [GeV] | steps | network calls | batch | points/shower | shape | points "
             "| calibration | projection | sum of stages | **generate() ms/shower** | peak host MiB "
             "| peak GPU MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        gpu = f"{r['peak_device_mib']:.0f}" if r.get("peak_device_mib") is not None else "–"
        lines.append(
            f"| {r.get('threads') or 'GPU'} | {r['energy_gev']:g} | {r['steps']} | "
            f"{r.get('network_calls', '–')} | {r['batch']} | "
            f"{r['points_per_shower']:.0f} | {r['shape_ms']:.3g} | {r['points_ms']:.3g} | "
            f"{r['calibration_ms']:.3g} | {r.get('projection_ms', float('nan')):.3g} | "
            f"{r['total_ms']:.3g} | **{r['end_to_end_ms']:.3g}** | {r['peak_host_mib']:.0f} | {gpu} |")
    if result["skipped"]:
        lines += ["", f"Skipped (predicted over the {result['budget_s']:g} s budget): " + ", ".join(
            f"{s['threads']} thr/{s['energy_gev']:g} GeV/{s['steps']} steps/batch {s['batch']}"
            for s in result["skipped"])]
    if result["reference"]:
        lines += ["", "The project's engines in the same run (detector frame, same geometry and "
                  "conditions):", "", "| engine | threads | E [GeV] | showers | ms/shower |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r.get('engine', 'parametrised')} | {r['threads']} | {r['energy_gev']:g} | "
                  f"{r['n']} | {r['ms_per_shower']:.3g} |" for r in result["reference"]]
    if result.get("ratios"):
        lines += ["", "generate() against each engine, same run (engine ms / generate() ms: "
                  "above 1 the model is faster):", "",
                  "| engine | threads | E [GeV] | steps | batch | engine ms | generate() ms | "
                  "ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['engine']} | {r['threads']} | {r['energy_gev']:g} | {r['steps']} | "
                  f"{r['batch']} | {r['engine_ms']:.3g} | {r['generate_ms']:.3g} | "
                  f"**×{r['speed_up']:.3g}** |" for r in result["ratios"]]
    return "\n".join(lines) + "\n"


def plot_scaling(result: dict, path: str | Path) -> Path:
    """Time per shower against batch size (per step count) and against points per shower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    threads = sorted({r.get("threads") or 0 for r in runs})
    mid_energy = sorted({r["energy_gev"] for r in runs})[len({r["energy_gev"] for r in runs}) // 2]
    for t in threads:
        for s in sorted({r["steps"] for r in runs}):
            sel = sorted((r for r in runs if (r.get("threads") or 0) == t and r["steps"] == s
                          and r["energy_gev"] == mid_energy), key=lambda r: r["batch"])
            if sel:
                label = f"{s} steps" + (f", {t} thr" if t else "")
                ax1.plot([r["batch"] for r in sel], [r["end_to_end_ms"] for r in sel], "o-",
                         label=label)
    ax1.set(xscale="log", yscale="log", xlabel="batch size [showers]", ylabel="ms / shower",
            title=f"end to end, {mid_energy:g} GeV, {result['device']}")
    ax1.legend(fontsize=8)
    big = max(r["batch"] for r in runs)
    for s in sorted({r["steps"] for r in runs}):
        sel = sorted((r for r in runs if r["steps"] == s and r["batch"] == big
                      and (r.get("threads") or 0) == threads[0]), key=lambda r: r["points_per_shower"])
        if sel:
            ax2.plot([r["points_per_shower"] for r in sel], [r["points_ms"] for r in sel], "o-",
                     label=f"{s} steps")
    ax2.set(xlabel="points per shower (10/50/90 GeV)", ylabel="points stage ms / shower",
            title=f"sampler cost vs points, batch {big}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time the generation pipeline and the reference simulator",
        description="Time per shower of ShowerFlow, the point sampler, calibration and projection "
                    "for several sampler steps, batch sizes and energies, and the reference "
                    "simulator on the same machine. Writes JSON, a Markdown table and a PNG.")
    p.add_argument("--out", default="bench", help="output directory (default: bench)")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--geometry", default="ild", help="geometry to project on ('none' to skip)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", nargs="+", default=["1", "all"], help="CPU thread settings")
    p.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS),
                   help="sampler steps to time (default: %(default)s)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(DEFAULT_BATCH_SIZES),
                   help="showers per pass to time (default: %(default)s)")
    p.add_argument("--energies", nargs="+", type=float, default=list(DEFAULT_ENERGIES),
                   help="incident energies in GeV (default: %(default)s)")
    p.add_argument("--theta", type=float, default=90.0, help="polar angle in degrees")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats per configuration; the median is reported (default 3)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="skip configurations predicted to take longer than this many seconds")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype of the networks")
    p.add_argument("--reference-n", type=int, default=200,
                   help="showers for timing the parametrised engine (0: no engines timed)")
    p.add_argument("--against", default="parametrised", metavar="ENGINES",
                   help="the project's engines timed in the same run, comma separated: "
                        "parametrised, geant4 (needs the geant4 extra); the ratios are printed")
    p.add_argument("--geant4-n", type=int, default=10,
                   help="showers for timing the Geant4 engine (default 10)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from pcshower.allocator import tune_allocator

    tune_allocator()  # as pcshower generate runs
    threads = [None if t == "all" else int(t) for t in args.threads]
    result = run_benchmark(model=args.model, geometry=None if args.geometry == "none" else args.geometry,
                           device=args.device, threads=threads, steps=args.steps,
                           batch_sizes=args.batch_sizes, energies=args.energies,
                           theta_deg=args.theta, repeats=args.repeats, budget_s=args.budget,
                           dtype=args.dtype, reference_n=args.reference_n,
                           against=[e.strip() for e in args.against.split(",") if e.strip()],
                           geant4_n=args.geant4_n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{result['device_type']}_{args.dtype}"
    (out / f"bench_{tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"bench_{tag}.md").write_text(markdown_table(result))
    if result["runs"]:
        plot_scaling(result, out / f"bench_{tag}.png")
    print(markdown_table(result))
    return 0
