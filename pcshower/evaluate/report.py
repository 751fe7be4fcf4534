"""Compare a generated sample with a reference: every metric with its floor, in bins, as HTML + JSON.

The pipeline is: build an :class:`EvaluationSample` from each input (point clouds, cell hits or
CaloChallenge voxels; batches are streamed, only per-shower observables are kept), then
:func:`compare_samples` computes the metrics and :func:`write_report` writes ``index.html``,
``metrics.json`` and the PNGs. :func:`evaluate` does all three.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pcshower.data import CellHits, Showers
from pcshower.evaluate import plots
from pcshower.evaluate.classifier import deepsets_auc, gbdt_auc
from pcshower.evaluate.distances import fpd, kpd
from pcshower.evaluate.metrics import compare_with_floor, split_indices
from pcshower.evaluate.observables import (Observables, default_layer_edges, default_radial_edges,
                                           geometry_cell_observables, mip_threshold_mev,
                                           point_observables, shower_axes, transverse_basis)
from pcshower.evaluate.reconstruction import plot_reconstruction, reconstruction_check
from pcshower.units import DETECTOR_FRAME, GEV_TO_MEV

__all__ = ["EvaluationSample", "sample_from_showers", "sample_from_hits",
           "sample_from_calochallenge", "compare_samples", "write_report", "evaluate"]

log = logging.getLogger(__name__)

#: Observables shown in the summary table first (in this order) when present.
KEY_OBSERVABLES = ("visible_energy", "energy_ratio", "num_hits", "num_points", "cell_energy",
                   "point_energy", "cog_x", "cog_y", "cog_z", "width_u", "width_v", "width_long",
                   "pca_theta", "energy_first_layers", "energy_last_layers")


@dataclass
class EvaluationSample:
    """What the comparison needs from one sample.

    Attributes:
        name: label in plots and tables.
        level: ``"cells"`` (observables of cell hits) or ``"points"``.
        observables: per-shower :class:`Observables` of all showers.
        deposits: ``(features [H, F], ptr [B+1], cond [B, 2])`` of the first showers, for the
            Deep Sets classifier (None: skip it).
        examples: a few showers for event displays.
        settings: threshold, bin edges, geometry name … (to check two samples match).
    """

    name: str
    level: str
    observables: Observables
    deposits: tuple | None = None
    examples: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.observables)


class _DepositKeeper:
    """Keeps per-deposit features of the first ``limit`` showers across streamed batches."""

    def __init__(self, limit: int):
        self.limit, self.feats, self.counts, self.cond = int(limit), [], [], []
        self.held = 0

    def add(self, feats: torch.Tensor, ptr: torch.Tensor, cond: torch.Tensor) -> None:
        take = min(self.limit - self.held, ptr.numel() - 1)
        if take <= 0:
            return
        self.feats.append(feats[:int(ptr[take])].float().cpu())
        self.counts.append((ptr[1:take + 1] - ptr[:take]).cpu())
        self.cond.append(cond[:take].float().cpu())
        self.held += take

    def result(self):
        if not self.held:
            return None
        counts = torch.cat(self.counts)
        ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=ptr[1:])
        return torch.cat(self.feats), ptr, torch.cat(self.cond)


def _cond_features(energy_gev, theta) -> torch.Tensor:
    return torch.stack([torch.log(torch.as_tensor(energy_gev).double()),
                        torch.as_tensor(theta).double()], 1)


def _as_batches(showers, batch_size: int) -> Iterable[Showers]:
    if isinstance(showers, Showers):
        return showers.split(batch_size) if len(showers) > batch_size else [showers]
    return showers


def _hits_examples(hits: CellHits, obs_axis, centers_fn, layer_fn, count: int, threshold: float):
    out = []
    for i in range(min(count, len(hits))):
        a, b = int(hits.ptr[i]), int(hits.ptr[i + 1])
        e = hits.energy[a:b].double()
        keep = e >= threshold
        ids = hits.cell_id[a:b][keep]
        e = e[keep]
        if ids.numel() == 0:
            out.append({"kind": "cells", "layer": np.zeros(0), "uv": np.zeros((0, 2)),
                        "energy": np.zeros(0)})
            continue
        xyz = torch.as_tensor(centers_fn(ids)).double()
        cog = (xyz * e[:, None]).sum(0) / e.sum()
        axis = obs_axis[i:i + 1] if obs_axis is not None else torch.tensor([[0.0, 0.0, 1.0]],
                                                                            dtype=torch.float64)
        u, v = transverse_basis(axis)
        d = xyz - cog
        uv = torch.stack([(d * u).sum(1), (d * v).sum(1)], 1)
        out.append({"kind": "cells", "layer": torch.as_tensor(layer_fn(ids)).numpy(),
                    "uv": uv.numpy(), "energy": e.numpy()})
    return out


def sample_from_showers(showers, *, name: str, geometry=None, threshold_mev: float | None = None,
                        layer_edges=None, radial_edges=None, batch_size: int = 2000,
                        max_showers: int | None = None, keep_deposits: int = 20000,
                        examples: int = 3, seed: int = 0, progress: bool = True,
                        total: int | None = None, transform_hits=None) -> EvaluationSample:
    """Evaluation sample from point clouds (a :class:`Showers` or an iterable of batches).

    With a ``geometry`` the showers are projected to its cells (with the geometry's sampling
    fluctuations, seeded) and the observables are those of the cell hits, plus the point count
    and point-energy spectrum; without one, the point observables. Pass the reference's
    ``settings["layer_edges"]``/``["radial_edges"]`` when building the generated sample so both
    use the same bins (:func:`evaluate` does). ``transform_hits`` (CellHits -> CellHits) is
    applied to each projected batch, e.g. to emulate a dead layer (:func:`drop_layers`).
    """
    gen = torch.Generator().manual_seed(seed)
    parts, seen = [], 0
    keeper = _DepositKeeper(keep_deposits)
    example_list: list = []
    settings = {"geometry": getattr(geometry, "name", None)}
    bar = tqdm(total=total if max_showers is None else min(total or max_showers, max_showers),
               desc=f"observables {name}", unit="shower", disable=not progress, leave=False)
    for batch in _as_batches(showers, batch_size):
        if max_showers is not None and seen >= max_showers:
            break
        if max_showers is not None and seen + len(batch) > max_showers:
            batch = batch[:max_showers - seen]
        if geometry is not None:
            if threshold_mev is None:
                threshold_mev = mip_threshold_mev(geometry)
            if radial_edges is None:
                radial_edges = default_radial_edges(3.0 * float(geometry.rm_eff_mm), bins=12)
            response = None
            if batch.frame != DETECTOR_FRAME:  # recorded Geant4 deposits: Geant4's response
                from pcshower.geometry.response import resolve_response

                response, settings["layer_response"] = resolve_response(
                    "auto", batch.metadata, geometry)
            hits = geometry.project(batch, generator=gen, response=response)
            if transform_hits is not None:
                hits = transform_hits(hits)
            cond = {"energy": batch.energy, "theta": batch.theta, "phi": batch.phi}
            obs = geometry_cell_observables(hits, geometry, cond, threshold_mev=threshold_mev,
                                            radial_edges=radial_edges, seed=seed + seen)
            obs.scalars["num_points"] = batch.num_points.to(torch.float64)
            e_pts = batch.e.double()
            if batch.frame != DETECTOR_FRAME:  # fractions -> MeV, to compare with cell energies
                e_pts = e_pts * (batch.energy.double() * GEV_TO_MEV)[batch.batch]
            cap = 2_000_000
            if e_pts.numel() > cap:
                pick = torch.randperm(e_pts.numel(), generator=gen)[:cap].sort().values
                obs.spectra["point_energy"] = (e_pts[pick], batch.batch[pick])
            else:
                obs.spectra["point_energy"] = (e_pts, batch.batch)
            obs.units["point_energy"] = "MeV"
            _keep_cells(keeper, hits, geometry, threshold_mev, batch.energy, batch.theta)
            if len(example_list) < examples:
                axis = shower_axes(geometry, batch.theta, batch.phi)
                example_list += _hits_examples(hits, axis, geometry.cell_centers,
                                               geometry.cell_layer, examples - len(example_list),
                                               threshold_mev)
            level = "cells"
            settings.update(threshold_mev=threshold_mev)
        else:
            if layer_edges is None:
                layer_edges = default_layer_edges(batch)
            if radial_edges is None:
                radial_edges = default_radial_edges(60.0 if batch.frame == DETECTOR_FRAME else 3.0)
            obs = point_observables(batch, layer_edges=layer_edges, radial_edges=radial_edges,
                                    seed=seed + seen)
            feats = torch.cat([batch.points[:, :3].double(),
                               torch.log10(batch.e.double().clamp_min(1e-12))[:, None]], 1)
            keeper.add(feats, batch.ptr, _cond_features(batch.energy, batch.theta))
            for i in range(min(examples - len(example_list), len(batch))):
                example_list.append({"kind": "points", "points": batch.shower(i)[:, :4].numpy(),
                                     "frame": batch.frame})
            level = "points"
            settings.update(layer_edges=np.asarray(layer_edges).tolist(), frame=batch.frame)
        parts.append(obs)
        seen += len(batch)
        bar.update(len(batch))
    bar.close()
    if not parts:
        raise ValueError(f"sample {name!r} holds no showers")
    settings["radial_edges"] = np.asarray(radial_edges).tolist()
    return EvaluationSample(name, level, Observables.concat(parts), keeper.result(), example_list,
                            settings)


def _keep_cells(keeper: _DepositKeeper, hits: CellHits, geometry, threshold_mev, energy, theta):
    if keeper.held >= keeper.limit:
        return
    take = min(keeper.limit - keeper.held, len(hits))
    end = int(hits.ptr[take])
    e = hits.energy[:end].double()
    keep = e >= threshold_mev
    ids = hits.cell_id[:end][keep]
    shower = hits.batch[:end][keep]
    counts = torch.bincount(shower, minlength=take)
    ptr = torch.zeros(take + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    feats = torch.cat([torch.as_tensor(geometry.cell_centers(ids)).double(),
                       torch.as_tensor(geometry.cell_layer(ids)).double()[:, None],
                       torch.log10(e[keep])[:, None]], 1)
    keeper.add(feats, ptr, _cond_features(energy[:take], theta[:take]))


def sample_from_hits(hits: CellHits, conditions: dict, geometry, *, name: str,
                     threshold_mev: float | None = None, radial_edges=None,
                     batch_size: int = 5000, keep_deposits: int = 20000, examples: int = 3,
                     seed: int = 0, progress: bool = True) -> EvaluationSample:
    """Evaluation sample from cell hits (MeV) and their conditions (``energy`` [GeV], ``theta``,
    ``phi`` [rad] per shower) in ``geometry``."""
    if threshold_mev is None:
        threshold_mev = mip_threshold_mev(geometry)
    if radial_edges is None:
        radial_edges = default_radial_edges(3.0 * float(geometry.rm_eff_mm), bins=12)
    n = len(hits)
    energy = torch.as_tensor(conditions["energy"]).double().reshape(-1)
    theta = torch.as_tensor(conditions.get("theta", torch.zeros(n))).double().reshape(-1)
    phi = torch.as_tensor(conditions.get("phi", torch.zeros(n))).double().reshape(-1)
    keeper = _DepositKeeper(keep_deposits)
    parts, example_list = [], []
    for start in tqdm(range(0, n, batch_size), desc=f"observables {name}", disable=not progress,
                      leave=False):
        stop = min(start + batch_size, n)
        a, b = int(hits.ptr[start]), int(hits.ptr[stop])
        part = CellHits(hits.cell_id[a:b], hits.energy[a:b], hits.ptr[start:stop + 1] - a,
                        hits.num_cells, hits.geometry)
        cond = {"energy": energy[start:stop], "theta": theta[start:stop], "phi": phi[start:stop]}
        parts.append(geometry_cell_observables(part, geometry, cond, threshold_mev=threshold_mev,
                                               radial_edges=radial_edges, seed=seed + start))
        _keep_cells(keeper, part, geometry, threshold_mev, cond["energy"], cond["theta"])
        if len(example_list) < examples:
            example_list += _hits_examples(part, shower_axes(geometry, cond["theta"], cond["phi"]),
                                           geometry.cell_centers, geometry.cell_layer,
                                           examples - len(example_list), threshold_mev)
    if not parts:
        raise ValueError(f"sample {name!r} holds no showers")
    settings = {"geometry": getattr(geometry, "name", None), "threshold_mev": threshold_mev,
                "radial_edges": np.asarray(radial_edges).tolist()}
    return EvaluationSample(name, "cells", Observables.concat(parts), keeper.result(),
                            example_list, settings)


def sample_from_calochallenge(incident_energies_mev, showers_mev, geometry, *, name: str,
                              threshold_mev: float | None = None, **kwargs) -> EvaluationSample:
    """Evaluation sample from CaloChallenge arrays (``incident_energies`` [N] and voxel energies
    [N, V], MeV, in the geometry's voxel order and its CaloChallenge energy convention, e.g.
    Si deposits / 0.033 for datasets 2 and 3). The voxels are brought back to visible energy
    (divided by ``geometry.calochallenge_energy_scale``), so that they compare with pcshower's
    cell hits. The default threshold is the CaloChallenge per-voxel threshold (15.15 keV in the
    files' units: 0.5 keV visible for datasets 2 and 3) when the geometry is a CaloChallenge
    one, else half a MIP."""
    scale = float(getattr(geometry, "calochallenge_energy_scale", 1.0))
    vox = torch.as_tensor(np.asarray(showers_mev), dtype=torch.float32) / scale
    if vox.ndim != 2 or vox.shape[1] != geometry.num_cells:
        raise ValueError(f"CaloChallenge showers have {tuple(vox.shape)} voxels per shower but "
                         f"geometry {geometry.name!r} has {geometry.num_cells} cells: pick the "
                         "matching --geometry (calochallenge_ds1_photons, calochallenge_ds2, …)")
    if threshold_mev is None:
        threshold_mev = 0.01515 / scale if "calochallenge" in str(geometry.name) else None
    hits = CellHits.from_dense(vox, geometry=geometry.name)
    inc = torch.as_tensor(np.asarray(incident_energies_mev), dtype=torch.float64).reshape(-1)
    cond = {"energy": inc / GEV_TO_MEV, "theta": torch.zeros(len(inc)), "phi": torch.zeros(len(inc))}
    return sample_from_hits(hits, cond, geometry, name=name, threshold_mev=threshold_mev, **kwargs)


# ---------------------------------------------------------------------------------- metrics
#: Per-deposit spectra are subsampled to at most this many entries before the 1-D metrics.
MAX_SPECTRUM_ENTRIES = 2_000_000


def _one_dimensional(sample: EvaluationSample, seed: int = 0) -> tuple[dict, dict]:
    obs = sample.observables
    values = obs.one_dimensional()
    owners = {}
    rng = np.random.default_rng(seed)
    for k, (v, owner) in obs.spectra.items():
        v, owner = v.detach().cpu().double().numpy(), owner.detach().cpu().numpy()
        if v.size > MAX_SPECTRUM_ENTRIES:  # a uniform subsample keeps the shape, bounds the sorts
            pick = np.sort(rng.choice(v.size, MAX_SPECTRUM_ENTRIES, replace=False))
            v, owner = v[pick], owner[pick]
        values[k], owners[k] = v, owner
    return values, owners


def _check_compatible(generated: EvaluationSample, reference: EvaluationSample) -> None:
    if generated.level != reference.level:
        raise ValueError(f"cannot compare {generated.level} ({generated.name}) with "
                         f"{reference.level} ({reference.name}): give both samples a geometry "
                         "or neither")
    for key in ("radial_edges", "layer_edges", "threshold_mev", "geometry"):
        a, b = generated.settings.get(key), reference.settings.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"the samples were built with different {key} ({a} vs {b}): build "
                             "the generated sample with the reference's settings")


def _distances(gen: np.ndarray, ref: np.ndarray, n_boot_seed: int, kpd_batch: int,
               fpd_max: int) -> dict:
    n = len(ref)
    half = n // 2
    rng = np.random.default_rng(n_boot_seed)
    perm = rng.permutation(n)
    ra, rb = ref[perm[:half]], ref[perm[half:2 * half]]
    g = gen[rng.permutation(len(gen))[:half]]
    out = {}
    kb = min(kpd_batch, max(half // 2, 2))  # batches must differ to give a spread
    k_val, k_err = kpd(ra, g, batch_size=kb, seed=n_boot_seed)
    f_val, f_err = kpd(ra, rb, batch_size=kb, seed=n_boot_seed)
    out["kpd"] = {"value": k_val, "value_err": k_err, "floor": f_val, "floor_err": f_err}
    fmax = min(fpd_max, half)
    try:
        fmin = max(fmax // 2, min(fmax, 2 * ref.shape[1] + 10))
        f1 = fpd(ra, g, min_samples=fmin, max_samples=fmax, num_batches=5, num_points=5,
                 seed=n_boot_seed)
        f2 = fpd(ra, rb, min_samples=fmin, max_samples=fmax, num_batches=5, num_points=5,
                 seed=n_boot_seed)
        out["fpd"] = {"value": f1[0], "value_err": f1[1], "floor": f2[0], "floor_err": f2[1]}
    except ValueError as err:
        out["fpd"] = {"skipped": str(err)}
    return out


def _clean_features(gen: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop features that are constant in the reference (they carry no information and make the
    covariance singular)."""
    keep = np.std(ref, axis=0) > 0
    return gen[:, keep], ref[:, keep]


#: Quantities of a model's internal point cloud, not of the detector: the number of points and
#: the point-energy spectrum depend on the grid the training data were merged on (the reference's
#: own points on another). Compared cell-level samples report them, but they are not features
#: of the classifier or KPD/FPD and not part of the summary (docs/evaluation.md).
POINT_DIAGNOSTICS = ("num_points", "point_energy")


def _diagnostics(level: str) -> tuple[str, ...]:
    return POINT_DIAGNOSTICS if level == "cells" else ()


def _metrics(gen: EvaluationSample, ref: EvaluationSample, *, n_boot, seed, bins,
             distances, kpd_batch, fpd_max) -> dict:
    gv, go = _one_dimensional(gen, seed)
    rv, ro = _one_dimensional(ref, seed + 1)
    only = sorted(set(rv) ^ set(gv))
    res = {"n_generated": len(gen), "n_reference": len(ref),
           "not_compared": [k for k in only if "[" not in k],
           "observables": compare_with_floor(gv, rv, n_gen=len(gen), n_ref=len(ref),
                                             generated_owner=go, reference_owner=ro,
                                             n_boot=n_boot, bins=bins, seed=seed)}
    # plain means of the per-shower scalars: the first thing a physicist asks after "how far"
    res["means"] = {k: {"generated": float(np.mean(gv[k])), "reference": float(np.mean(rv[k]))}
                    for k in gen.observables.scalars if k in gv and k in rv and len(gv[k]) and len(rv[k])}
    if distances:
        skip = _diagnostics(gen.level)
        gf, rf = _clean_features(gen.observables.feature_matrix(exclude=skip),
                                 ref.observables.feature_matrix(exclude=skip))
        if len(rf) >= 8 and len(gf) >= 4:
            res.update(_distances(gf, rf, seed, kpd_batch, fpd_max))
    return res


def _auc_floor(run, gen_x, ref_x, seed):
    """AUC of the generated sample and of half the reference against the other half."""
    n = len(ref_x) if not isinstance(ref_x, tuple) else ref_x[1].numel() - 1
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    a, b = np.sort(perm[:n // 2]), np.sort(perm[n // 2:])
    return run(gen_x, ref_x), run(_take(ref_x, a), _take(ref_x, b))


def _take(x, idx):
    if not isinstance(x, tuple):
        return x[idx]
    feats, ptr, cond = x
    idx = torch.as_tensor(idx)
    counts = (ptr[1:] - ptr[:-1])[idx]
    starts = ptr[:-1][idx]
    new_ptr = torch.zeros(idx.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=new_ptr[1:])
    offs = torch.arange(int(new_ptr[-1])) - torch.repeat_interleave(new_ptr[:-1], counts)
    rows = torch.repeat_interleave(starts, counts) + offs
    return feats[rows], new_ptr, cond[idx]


def compare_samples(generated: EvaluationSample, reference: EvaluationSample, *, n_boot: int = 10,
                    seed: int = 0, bins: int = 40, classifier: bool = True, network: bool = True,
                    distances: bool = True, energy_bins=None, theta_bins=None,
                    kpd_batch: int = 5000, fpd_max: int = 20000, classifier_max: int = 50000,
                    network_max: int = 5000, network_epochs: int = 5, min_bin_showers: int = 40) -> dict:
    """All metrics of ``generated`` against ``reference``, each with its floor.

    Args:
        n_boot: random reference splits for the 1-D metric floors.
        classifier / network: run the gradient-boosting / Deep Sets classifier tests.
        energy_bins: incident-energy bin edges [GeV] for the conditional views (None: none).
        theta_bins: polar-angle bin edges [rad] for the conditional views.
        min_bin_showers: conditional bins with fewer reference showers are skipped.

    Returns:
        a JSON-able dict (see ``docs/evaluation.md`` for the keys).
    """
    _check_compatible(generated, reference)
    t0 = time.perf_counter()
    result = {"generated": generated.name, "reference": reference.name, "level": generated.level,
              "settings": {**reference.settings, "n_boot": n_boot, "seed": seed, "bins": bins}}
    timings = {}

    def lap(name, start):
        timings[name] = round(time.perf_counter() - start, 2)
        log.info("%s: %.1f s", name, timings[name])
        return time.perf_counter()

    t = time.perf_counter()
    result.update(_metrics(generated, reference, n_boot=n_boot, seed=seed, bins=bins,
                           distances=distances, kpd_batch=kpd_batch, fpd_max=fpd_max))
    t = lap("metrics_1d_kpd_fpd", t)
    if classifier:
        inc = True
        skip = _diagnostics(generated.level)
        gx, rx = _clean_features(generated.observables.feature_matrix(inc, exclude=skip),
                                 reference.observables.feature_matrix(inc, exclude=skip))

        def run_gbdt(a, b):
            return gbdt_auc(a, b, max_per_class=classifier_max, seed=seed)

        value, floor = _auc_floor(run_gbdt, gx, rx, seed)
        result["classifier_gbdt"] = {"auc": value["auc"], "floor_auc": floor["auc"],
                                     "n_train": value["n_train"], "n_test": value["n_test"],
                                     "features": "high-level observables + log E, theta"}
        t = lap("classifier_gbdt", t)
    if network and generated.deposits is not None and reference.deposits is not None:
        def run_net(a, b):
            return deepsets_auc(a, b, epochs=network_epochs, max_per_class=network_max, seed=seed)

        value, floor = _auc_floor(run_net, generated.deposits, reference.deposits, seed)
        result["classifier_deepsets"] = {"auc": value["auc"], "floor_auc": floor["auc"],
                                         "n_train": value["n_train"], "n_test": value["n_test"],
                                         "features": "per-deposit position, layer, log10 energy"}
        t = lap("classifier_deepsets", t)
    result["conditional"] = _conditional(generated, reference, energy_bins, theta_bins,
                                         n_boot=n_boot, seed=seed, bins=bins, distances=distances,
                                         kpd_batch=kpd_batch, fpd_max=fpd_max,
                                         min_showers=min_bin_showers)
    t = lap("conditional", t)
    if generated.level == "cells" and "pca_theta" in generated.observables.scalars:
        result["reconstruction"] = reconstruction_check(
            generated.observables, reference.observables, energy_bins=energy_bins,
            theta_bins=theta_bins)
        lap("reconstruction", t)
    result["summary"] = summarise(result, exclude=_diagnostics(generated.level))
    result["timings_s"] = timings
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _subsample(sample: EvaluationSample, mask: torch.Tensor) -> EvaluationSample:
    return EvaluationSample(sample.name, sample.level, sample.observables.select(mask), None, [],
                            sample.settings)


def _conditional(gen, ref, energy_bins, theta_bins, *, min_showers, **kw) -> list[dict]:
    if energy_bins is None and theta_bins is None:
        return []
    e_edges = list(energy_bins) if energy_bins is not None else [0.0, math.inf]
    t_edges = list(theta_bins) if theta_bins is not None else [0.0, math.pi]
    out = []
    ge, gt = gen.observables.conditions["energy"].cpu(), gen.observables.conditions["theta"].cpu()
    re, rt = ref.observables.conditions["energy"].cpu(), ref.observables.conditions["theta"].cpu()
    for e_lo, e_hi in zip(e_edges[:-1], e_edges[1:]):
        for t_lo, t_hi in zip(t_edges[:-1], t_edges[1:]):
            gm = (ge >= e_lo) & (ge < e_hi) & (gt >= t_lo) & (gt <= t_hi)
            rm = (re >= e_lo) & (re < e_hi) & (rt >= t_lo) & (rt <= t_hi)
            entry = {"energy_gev": [e_lo, e_hi], "theta_rad": [t_lo, t_hi],
                     "n_generated": int(gm.sum()), "n_reference": int(rm.sum())}
            if entry["n_reference"] < min_showers or entry["n_generated"] < min_showers // 2:
                entry["skipped"] = f"fewer than {min_showers} reference showers"
            else:
                entry.update(_metrics(_subsample(gen, gm), _subsample(ref, rm), **kw))
                entry["summary"] = summarise(entry, exclude=_diagnostics(gen.level))
            out.append(entry)
    return out


def summarise(result: dict, exclude=()) -> dict:
    """Headline numbers: median and worst ratio to floor of W1 and separation power over the
    per-shower observables and spectra (profile bins are summarised by their median); the
    observables named in ``exclude`` (diagnostics) are left out and listed."""
    obs = {k: v for k, v in result.get("observables", {}).items() if k not in exclude}
    if not obs:
        return {}
    # a floor of exactly 0 (both reference halves identical, e.g. an observable that is always
    # 0 in a conditional bin) gives an infinite ratio: listed apart, not in the maxima
    ratios = {k: (v["w1"]["ratio"], v["separation_power"]["ratio"]) for k, v in obs.items()
              if v["w1"]["floor"] > 0}
    zero_floor = sorted(k for k, v in obs.items() if not v["w1"]["floor"] > 0)
    if not ratios:
        return {"zero_floor": zero_floor}
    w = np.array([r[0] for r in ratios.values()])
    s = np.array([r[1] for r in ratios.values()])
    s = s[np.isfinite(s)]
    worst = sorted(ratios, key=lambda k: -ratios[k][0])[:5]
    return {"w1_ratio_median": float(np.nanmedian(w)), "w1_ratio_max": float(np.nanmax(w)),
            "separation_ratio_median": float(np.nanmedian(s)) if s.size else float("nan"),
            "separation_ratio_max": float(np.nanmax(s)) if s.size else float("nan"),
            "worst_w1": worst, "zero_floor": zero_floor,
            "diagnostics": sorted(k for k in result.get("observables", {}) if k in exclude)}


# ---------------------------------------------------------------------------------- report
def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def _panels(gen: EvaluationSample, ref: EvaluationSample, names, metrics) -> list[dict]:
    obs_g, obs_r = gen.observables, ref.observables
    panels = []
    for name in names:
        if name in obs_r.scalars and name in obs_g.scalars:
            g = obs_g.scalars[name].cpu().numpy()
            r = obs_r.scalars[name].cpu().numpy()
            log = False
        elif name in obs_r.spectra and name in obs_g.spectra:
            g = np.log10(np.clip(obs_g.spectra[name][0].cpu().numpy(), 1e-12, None))
            r = np.log10(np.clip(obs_r.spectra[name][0].cpu().numpy(), 1e-12, None))
            log = True
        else:
            continue
        from pcshower.evaluate.metrics import histogram_edges

        edges = np.asarray(metrics[name]["edges"]) if not log else histogram_edges(r, 40)
        unit = obs_r.units.get(name, "")
        label = f"log10 {name}" if log else name
        panels.append({"generated": g, "reference": r, "edges": edges, "label": label,
                       "unit": unit, "log": log, "metrics": metrics.get(name)})
    return panels


def _profile_panels(gen, ref) -> list[dict]:
    og, orf = gen.observables, ref.observables
    nl = orf.profiles["layer_energy"].shape[1]
    layers = np.arange(nl)
    redges = np.asarray(orf.edges["radial"])
    rc = 0.5 * (redges[1:] + redges[:-1])
    unit = orf.units.get("radial_energy", "")
    r_unit = "mm" if unit == "MeV" else "R_M"
    return [
        {"generated": og.profiles["layer_energy"].cpu().numpy(),
         "reference": orf.profiles["layer_energy"].cpu().numpy(), "centers": layers,
         "label": "longitudinal profile", "ylabel": f"<E> per layer [{unit}]",
         "xlabel": "layer" if gen.level == "cells" else "depth bin", "log": True},
        {"generated": og.profiles["radial_energy"].cpu().numpy(),
         "reference": orf.profiles["radial_energy"].cpu().numpy(), "centers": rc,
         "label": "radial profile", "ylabel": f"<E> per bin [{unit}]",
         "xlabel": f"distance from the shower axis [{r_unit}]", "log": True},
        {"generated": og.profiles["layer_occupancy"].cpu().numpy(),
         "reference": orf.profiles["layer_occupancy"].cpu().numpy(), "centers": layers,
         "label": "occupancy per layer", "ylabel": "<hits> per layer",
         "xlabel": "layer" if gen.level == "cells" else "depth bin", "log": False},
    ]


def _floor_chart(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    obs = result["observables"]
    names = [k for k in KEY_OBSERVABLES if k in obs]
    for prof in ("layer_energy", "radial_energy", "layer_occupancy"):
        ks = [k for k in obs if k.startswith(prof + "[")]
        names += ks
    w = np.array([obs[k]["w1"]["ratio"] for k in names])
    s = np.array([obs[k]["separation_power"]["ratio"] for k in names])
    fig, ax = plt.subplots(figsize=(max(8, 0.16 * len(names)), 3.8), dpi=110)
    x = np.arange(len(names))
    ax.bar(x - 0.2, w, 0.4, label="W1 / floor", color=plots.GEN_COLOR)
    ax.bar(x + 0.2, s, 0.4, label="separation power / floor", color="#1f77b4")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("metric / reference floor")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(f"{result['generated']} vs {result['reference']}: 1 = statistical floor", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _display(sample: EvaluationSample, path: Path, k: int) -> Path | None:
    if len(sample.examples) <= k:
        return None
    ex = sample.examples[k]
    title = f"{sample.name}: shower {k}"
    if ex["kind"] == "points":
        units = ("[R_M]", "[R_M]", "[X0]", "[E/E_inc]") if ex["frame"] != DETECTOR_FRAME else \
            ("[mm]", "[mm]", "[mm]", "[MeV]")
        return plots.event_display_points(ex["points"], path, title=title, units=units)
    return plots.event_display_cells(ex["layer"], ex["uv"], ex["energy"], path, title=title)


def write_report(result: dict, generated: EvaluationSample, reference: EvaluationSample,
                 out_dir, *, prefix: str = "evaluate_", title: str | None = None) -> Path:
    """Write ``metrics.json``, the PNGs and ``index.html`` (which shows them) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=_json_default))
    names = (generated.name, reference.name)
    obs = result["observables"]
    images = []
    energy_names = ["visible_energy", "energy_ratio", "num_hits", "num_points", "cell_energy",
                    "point_energy", "energy_first_layers", "energy_last_layers"]
    shape_names = ["cog_x", "cog_y", "cog_z", "width_u", "width_v", "width_long", "pca_theta"]
    for tag, group, heading in (("energy", energy_names, "Energy and hits"),
                                ("shape", shape_names, "Centre of gravity and widths")):
        panels = _panels(generated, reference, group, obs)
        if panels:
            images.append((heading, plots.observable_grid(panels, out / f"{prefix}{tag}.png",
                                                          names=names)))
    images.append(("Profiles", plots.profile_grid(_profile_panels(generated, reference),
                                                  out / f"{prefix}profiles.png", names=names)))
    images.append(("Metrics relative to the floor", _floor_chart(result, out / f"{prefix}floor.png")))
    if "reconstruction" in result:
        images.append(("Reconstruction: calibrated energy and shower-axis angle",
                       plot_reconstruction(result["reconstruction"], out / f"{prefix}reconstruction.png",
                                           names=names)))
    for sample, tag in ((generated, "generated"), (reference, "reference")):
        p = _display(sample, out / f"{prefix}display_{tag}.png", 0)
        if p is not None:
            images.append((f"Event display: {sample.name}", p))
    (out / "index.html").write_text(_html(result, images, out, title))
    return out / "index.html"


def _metric_rows(obs: dict, keys, diagnostics=()) -> str:
    rows = []
    for k in keys:
        if k not in obs:
            continue
        w, s = obs[k]["w1"], obs[k]["separation_power"]
        flag = ' class="bad"' if (w["ratio"] > 3 or s["ratio"] > 3) and k not in diagnostics else ""
        label = html.escape(k) + (" (diagnostic: model points, not in the summary)"
                                  if k in diagnostics else "")
        rows.append(f"<tr{flag}><td>{label}</td><td>{_fmt(w['value'])} ± {_fmt(w['value_err'], 2)}"
                    f"</td><td>{_fmt(w['floor'])} ± {_fmt(w['floor_err'], 2)}</td><td>{_fmt(w['ratio'])}"
                    f"</td><td>{_fmt(s['value'])} ± {_fmt(s['value_err'], 2)}</td><td>{_fmt(s['floor'])}"
                    f" ± {_fmt(s['floor_err'], 2)}</td><td>{_fmt(s['ratio'])}</td></tr>")
    return "\n".join(rows)


def _reconstruction_html(check: dict | None, result: dict) -> str:
    if not check:
        return ""

    def pm(d, key, scale=1.0, digits=3):
        if key not in d:
            return "–"
        return f"{_fmt(scale * d[key], digits)} ± {_fmt(scale * d[key + '_err'], 2)}"

    gen, ref = html.escape(result["generated"]), html.escape(result["reference"])
    cal = check["calibration"]
    rows = [f"<tr><td>{_fmt(r['energy_gev'][0])}–{_fmt(r['energy_gev'][1])} GeV</td>"
            f"<td>{r['generated']['n']}</td><td>{r['reference']['n']}</td>"
            f"<td>{pm(r['generated'], 'response')}</td><td>{pm(r['reference'], 'response')}</td>"
            f"<td>{pm(r['generated'], 'resolution', 100)}</td>"
            f"<td>{pm(r['reference'], 'resolution', 100)}</td></tr>" for r in check["energy"]]
    rows += [f"<tr><td>θ {_fmt(np.degrees(r['theta_rad'][0]))}–{_fmt(np.degrees(r['theta_rad'][1]))}"
             f" deg</td><td>{r['generated']['n']}</td><td>{r['reference']['n']}</td>"
             f"<td>{pm(r['generated'], 'mean')}</td><td>{pm(r['reference'], 'mean')}</td>"
             f"<td>{pm(r['generated'], 'std')}</td><td>{pm(r['reference'], 'std')}</td></tr>"
             for r in check["angle"]]
    return (f"<h2>Reconstruction level</h2><p>Energy: E_rec = {_fmt(cal['a_gev_per_unit'], 4)} × "
            f"E_vis + {_fmt(cal['b_gev'], 3)} GeV, fitted on the reference and applied to both; "
            f"response &lt;E_rec/E&gt; and resolution σ/&lt;E_rec/E&gt; [%]. Angle: θ of the "
            f"energy-weighted principal axis of the hits minus the incident θ, mean and σ "
            f"[mrad].</p><table><tr><th>bin</th><th>n {gen}</th><th>n {ref}</th>"
            f"<th>response / mean {gen}</th><th>response / mean {ref}</th>"
            f"<th>resolution / σ {gen}</th><th>resolution / σ {ref}</th></tr>"
            + "\n".join(rows) + "</table>")


def _html(result: dict, images, out: Path, title: str | None) -> str:
    obs = result["observables"]
    keys = [k for k in KEY_OBSERVABLES if k in obs]
    profile_keys = [k for k in obs if k not in keys]
    head = ("<tr><th>observable</th><th>W1</th><th>W1 floor</th><th>W1 / floor</th>"
            "<th>sep. power</th><th>floor</th><th>S / floor</th></tr>")
    summary = result.get("summary", {})
    glob = []
    for key, label in (("classifier_gbdt", "Classifier AUC, gradient boosting on high-level features"),
                       ("classifier_deepsets", "Classifier AUC, Deep Sets on cell hits/points")):
        if key in result:
            c = result[key]
            glob.append(f"<tr><td>{label}</td><td>{_fmt(c['auc'])}</td><td>{_fmt(c['floor_auc'])}"
                        f"</td><td>test showers: {c['n_test']}</td></tr>")
    for key, label in (("kpd", "KPD ×10³"), ("fpd", "FPD ×10³")):
        if key in result and "value" in result[key]:
            d = result[key]
            glob.append(f"<tr><td>{label}</td><td>{_fmt(1e3 * d['value'])} ± "
                        f"{_fmt(1e3 * d['value_err'], 2)}</td><td>{_fmt(1e3 * d['floor'])} ± "
                        f"{_fmt(1e3 * d['floor_err'], 2)}</td><td></td></tr>")
    cond_rows = []
    for c in result.get("conditional", []):
        if "skipped" in c:
            cond_rows.append(f"<tr><td>{_fmt(c['energy_gev'][0])}–{_fmt(c['energy_gev'][1])}</td>"
                             f"<td>{_fmt(np.degrees(c['theta_rad'][0]))}–{_fmt(np.degrees(c['theta_rad'][1]))}"
                             f"</td><td>{c['n_generated']}</td><td>{c['n_reference']}</td>"
                             f"<td colspan=4>{html.escape(c['skipped'])}</td></tr>")
            continue
        s = c["summary"]
        kp = c.get("kpd", {})
        cond_rows.append(
            f"<tr><td>{_fmt(c['energy_gev'][0])}–{_fmt(c['energy_gev'][1])}</td>"
            f"<td>{_fmt(np.degrees(c['theta_rad'][0]))}–{_fmt(np.degrees(c['theta_rad'][1]))}</td>"
            f"<td>{c['n_generated']}</td><td>{c['n_reference']}</td>"
            f"<td>{_fmt(s.get('w1_ratio_median'))}</td><td>{_fmt(s.get('w1_ratio_max'))} "
            f"({html.escape((s.get('worst_w1') or ['–'])[0])})</td>"
            f"<td>{_fmt(1e3 * kp['value']) if 'value' in kp else '–'}</td>"
            f"<td>{_fmt(1e3 * kp['floor']) if 'floor' in kp else '–'}</td></tr>")
    imgs = "\n".join(f"<h3>{html.escape(h)}</h3><img src=\"{html.escape(Path(p).name)}\">"
                     for h, p in images)
    title = title or f"pcshower evaluation: {result['generated']} vs {result['reference']}"
    cond_html = ""
    if cond_rows:
        cond_html = ("<h2>Conditional views</h2><table><tr><th>E [GeV]</th><th>θ [deg]</th>"
                     "<th>n gen</th><th>n ref</th><th>median W1/floor</th><th>max W1/floor</th>"
                     "<th>KPD ×10³</th><th>KPD floor ×10³</th></tr>" + "\n".join(cond_rows) +
                     "</table>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto}}table{{border-collapse:collapse;
font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}td:first-child{{
text-align:left}}tr.bad{{background:#fdd}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{result['n_generated']} generated and {result['n_reference']} reference showers, compared at
the level of <b>{html.escape(result['level'])}</b>. Every metric is given with its
<b>floor</b>: the same metric between two halves of the reference, averaged over
{result['settings']['n_boot']} random splits (± their standard deviation); the generated sample is
subsampled to the size of a half. A ratio near 1 means indistinguishable at this statistics.
Median W1/floor {_fmt(summary.get('w1_ratio_median'))}, worst {_fmt(summary.get('w1_ratio_max'))}
({html.escape(', '.join(summary.get('worst_w1', [])[:3]))}). Machine-readable:
<a href="metrics.json">metrics.json</a>.</p>
<h2>Global tests</h2><table><tr><th>test</th><th>value</th><th>floor (ref vs ref)</th><th></th></tr>
{''.join(glob)}</table>
<h2>Observables</h2><table>{head}
{_metric_rows(obs, keys, summary.get('diagnostics', ()))}</table>
{cond_html}
{_reconstruction_html(result.get("reconstruction"), result)}
{imgs}
<h2>Profile bins</h2><table>{head}
{_metric_rows(obs, profile_keys)}</table>
</body></html>
"""


def evaluate(generated, reference, *, geometry=None, out_dir=None, names=("generated", "reference"),
             threshold_mev: float | None = None, max_showers: int | None = None, seed: int = 0,
             progress: bool = True, **compare_kwargs) -> dict:
    """Compare two :class:`Showers` samples (or iterables of batches) end to end and, with
    ``out_dir``, write the report. Returns the metrics dict."""
    ref = sample_from_showers(reference, name=names[1], geometry=geometry, threshold_mev=threshold_mev,
                              max_showers=max_showers, seed=seed + 1, progress=progress)
    gen = sample_from_showers(generated, name=names[0], geometry=geometry,
                              threshold_mev=ref.settings.get("threshold_mev", threshold_mev),
                              layer_edges=ref.settings.get("layer_edges"),
                              radial_edges=ref.settings.get("radial_edges"),
                              max_showers=max_showers, seed=seed + 2, progress=progress)
    result = compare_samples(gen, ref, seed=seed, **compare_kwargs)
    if out_dir is not None:
        write_report(result, gen, ref, out_dir)
    return result
