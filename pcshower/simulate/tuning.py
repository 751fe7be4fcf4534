"""The parametrised engine tuned to Geant4, per material stack (what GFlash users do).

The published parametrisation (Grindhammer & Peters, hep-ex/0001020) was fitted to homogeneous
media with GEANT3; in a sampling stack simulated with Geant4 its showers start 1-2 X0 too late
and end too deep (docs/geant4.md). A *tune* keeps its formulas (:mod:`pcshower.simulate.gflash`)
and refits their coefficients to the Geant4 showers of one stack in the detector frame (what the
stack's layers saw: ``pcshower simulate --engine geant4 --frame detector`` or ``both``):

1. **Longitudinal and sampling**: ``<ln T>``, ``<ln alpha>`` and their widths
   and correlation as functions of ``ln y`` (G&P eqs. 11-13), the photon's mean conversion
   depth, and a scale of the stack's sampling fraction with an energy and an incidence-angle
   term (Geant4 sees 3.5-4.5 % more at 40 deg than at normal incidence, docs/geant4.md). For
   every Geant4 shower two model showers are drawn with the same (E, theta) and fixed noise;
   their mean per-layer visible energy is computed from the Gamma profile on a 0.1 X0 grid
   (each shower's axis crosses the real slabs at its angle) times the layer's sampling
   fraction. The fit minimises a chi-square between Geant4 and the model, in bins of energy and
   angle, of the mean energy of every layer, the mean and r.m.s. over showers of the
   longitudinal centre of gravity and of the longitudinal width, and the mean visible energy,
   each term divided by its Geant4 statistical error. The method is simulation-based
   (moments of the observable showers), so the discrete sampling layers and the photon's
   conversion are treated alike in data and model, without estimating any per-shower start.
2. **Radial**: the core and tail radii and the core weight (G&P eqs. 18-23) as
   functions of depth, fitted to the radial profile of Geant4's visible energy about the
   shower axis (radius over R_M,eff) in bins of energy and of axis depth over the shower's own
   centre of gravity, with the tuned longitudinal model's spots
   and the profile's analytic CDF ``F(r) = r^2 / (r^2 + R^2)`` per radial bin: a chi-square
   ``(model - Geant4)^2 / (Geant4 + 0.001)`` of the energy fractions in 19 radius bins, each
   depth bin weighted by its share of the energy (the radii that hold the energy decide; the
   far tail, where the r^-3 ansatz cannot follow Geant4's faster fall-off, counts little).

3. **Sampling fluctuations**: ``kappa`` of :mod:`pcshower.physics.sampling`, chosen so that the
   engine's energy resolution (sampling-weighted layer sum) matches Geant4's in three energy
   bins (:func:`fit_crossing_rms`).

The fits are deterministic: the same showers and seed give the same coefficients. Fits are
stored as YAML beside the geometries (``pcshower/geometries/tunes/<stack>.yaml``) with their
Geant4 provenance and fit statistics; :func:`parametrisation_for` picks the tune of a stack, or
the published coefficients with a one-line notice where a stack has none.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from pcshower.physics.sampling import sampling_layers
from pcshower.physics.stack import Stack
from pcshower.simulate import gflash
from pcshower.simulate.gflash import PUBLISHED, Parametrisation
from pcshower.simulate.parametrised import MAX_RADIUS_RM, _segment_softmax

__all__ = ["parametrisation_for", "shipped_tune", "sampling_scale", "load_tune", "write_tune", "fit_tune", "TUNES_DIR",
           "TUNE_FORMAT", "TuneError", "layer_energies"]

#: Version of the tune file layout.
TUNE_FORMAT = 1
TUNES_DIR = Path(__file__).resolve().parents[1] / "geometries" / "tunes"
#: Axis-depth step (X0) of the integrated longitudinal profile in the fit.
DEPTH_STEP_X0 = 0.1
_LONGITUDINAL = ("t_max", "alpha", "sigma_t", "sigma_alpha", "rho", "pair_length_x0", "sampling")
_RADIAL = ("r_core", "r_tail", "p_core")
_LENGTHS = {"t_max": 2, "alpha": 3, "sigma_t": 2, "sigma_alpha": 2, "rho": 2, "r_core": 4,
            "r_tail": 6, "p_core": 6, "pair_length_x0": 1, "sampling": 3, "crossing_rms": 1}
#: Coefficients that are one number (stored as one-element lists).
_SCALARS = ("pair_length_x0", "crossing_rms")
#: Provenance every tune must carry (it says which Geant4 it reproduces).
REQUIRED_PROVENANCE = ("engine", "generator", "geant4_version", "geant4_physics", "stack",
                       "showers")
_noticed: set[str] = set()


class TuneError(ValueError):
    """A tune file that cannot be used (names the file and the key)."""


# ---------------------------------------------------------------------------------- files
def _published_for(Z: float) -> dict:
    """The published coefficients with their Z dependence folded in at ``Z`` (Z slopes 0)."""
    p = PUBLISHED
    a0, a1, a2 = p.alpha
    rc, rt, wc = p.r_core, p.r_tail, p.p_core
    return {"t_max": list(p.t_max), "alpha": [a0, a1 + a2 / Z, 0.0],
            "sigma_t": list(p.sigma_t), "sigma_alpha": list(p.sigma_alpha), "rho": list(p.rho),
            "r_core": [rc[0], rc[1], rc[2] + rc[3] * Z, 0.0],
            "r_tail": [rt[0] + rt[1] * Z, 0.0, rt[2], rt[3], rt[4], rt[5]],
            "p_core": [wc[0] + wc[1] * Z, 0.0, wc[2] + wc[3] * Z, 0.0, wc[4], wc[5]],
            "pair_length_x0": [p.pair_length_x0], "sampling": list(p.sampling),
            "crossing_rms": [p.crossing_rms]}


def _as_parametrisation(values: dict, name: str) -> Parametrisation:
    fields = {k: (float(v[0]) if k in _SCALARS else tuple(float(x) for x in v))
              for k, v in values.items()}
    return Parametrisation(**fields, name=name)


def _values_of(par: Parametrisation) -> dict:
    d = asdict(par)
    d.pop("name")
    for k in _SCALARS:
        d[k] = [d[k]]
    return {k: [float(x) for x in v] for k, v in d.items()}


def load_tune(path) -> tuple[Parametrisation, dict]:
    """Read a tune file: ``(Parametrisation, the whole record)``; a clear error names the file
    and key of anything missing or malformed."""
    import yaml

    path = Path(path)
    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise TuneError(f"{path}: cannot read the tune file ({err})") from None
    except yaml.YAMLError as err:
        raise TuneError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(record, dict) or "pcshower_tune" not in record:
        raise TuneError(f"{path}: not a pcshower tune file (no 'pcshower_tune' key)")
    if record["pcshower_tune"] != TUNE_FORMAT:
        raise TuneError(f"{path}: tune format {record['pcshower_tune']!r}, this pcshower reads "
                        f"format {TUNE_FORMAT}: refit it with 'pcshower tune'")
    for key in ("stack", "stack_summary", "parametrisation", "provenance", "fit"):
        if key not in record:
            raise TuneError(f"{path}: missing key '{key}'")
    prov = record["provenance"]
    if not isinstance(prov, dict):
        raise TuneError(f"{path}: 'provenance' must be a mapping")
    for key in REQUIRED_PROVENANCE:
        if prov.get(key) in (None, ""):
            raise TuneError(f"{path}: missing key 'provenance.{key}' (a tune must say which "
                            "Geant4 showers it was fitted to)")
    if prov["engine"] != "geant4":
        raise TuneError(f"{path}: 'provenance.engine' is {prov['engine']!r}; tunes are fitted "
                        "to Geant4 showers ('geant4')")
    values = record["parametrisation"]
    if not isinstance(values, dict):
        raise TuneError(f"{path}: 'parametrisation' must be a mapping")
    for key, n in _LENGTHS.items():
        v = values.get(key)
        if v is None:
            raise TuneError(f"{path}: missing key 'parametrisation.{key}' ({n} numbers)")
        if (not isinstance(v, list) or len(v) != n
                or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)):
            raise TuneError(f"{path}: 'parametrisation.{key}' must be a list of {n} finite "
                            f"numbers, got {v!r}")
    unknown = sorted(set(values) - set(_LENGTHS))
    if unknown:
        raise TuneError(f"{path}: unknown key 'parametrisation.{unknown[0]}'")
    name = f"geant4-tune:{record['stack']} ({prov['generator']}, {prov['geant4_version']})"
    return _as_parametrisation(values, name), record


def _check_stack(record: dict, stack: Stack, path) -> None:
    want = record["stack_summary"]
    have = stack.summary()
    for key in ("layers", "depth_x0", "Z_eff"):
        if key not in want:
            raise TuneError(f"{path}: missing key 'stack_summary.{key}'")
        if not math.isclose(float(want[key]), float(have[key]), rel_tol=1e-6, abs_tol=1e-9):
            raise TuneError(f"{path} was fitted to a stack with {key} = {want[key]:.6g}, this "
                            f"stack ({stack.name!r}) has {have[key]:.6g}: use --tune published "
                            "or fit the stack with 'pcshower tune'")


def write_tune(path, par: Parametrisation, stack: Stack, provenance: dict, fit: dict) -> Path:
    """Write a tune file atomically (the layout :func:`load_tune` reads)."""
    import yaml

    from pcshower import __version__
    from pcshower.io._atomic import atomic_path

    record = {"pcshower_tune": TUNE_FORMAT, "stack": stack.name,
              "stack_summary": {k: v for k, v in stack.summary().items()
                                if k in ("layers", "depth_x0", "Z_eff", "x0_eff_mm", "rm_eff_mm",
                                         "ec_eff_mev")},
              "parametrisation": _values_of(par), "provenance": dict(provenance),
              "fit": {"pcshower_version": __version__, **fit}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("# pcshower tune of the parametrised engine to Geant4 (pcshower tune)\n"
                       + yaml.safe_dump(json_safe(record), sort_keys=False, width=100))
    return path


def json_safe(obj):
    """Plain Python numbers, lists and dicts (numpy scalars and tuples converted)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer, int)) and not isinstance(obj, bool):
        return int(obj)
    return obj


@functools.lru_cache(maxsize=64)
def _shipped(stack: Stack) -> Parametrisation | None:
    path = TUNES_DIR / f"{stack.name}.yaml"
    if not path.is_file():
        return None
    par, record = load_tune(path)
    try:
        _check_stack(record, stack, path)
    except TuneError:
        return None  # a stack that shares the name but not the layers
    return par


def shipped_tune(stack: Stack) -> Parametrisation | None:
    """The tune pcshower ships for ``stack`` (matched by name and layers), or None."""
    return _shipped(stack)


def sampling_scale(stack: Stack, energy_gev: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[B]`` the stack's Geant4-tuned multiplier of its sampling fraction for showers
    ``(E [GeV], theta_local [rad])``: what the geometry adapters apply when they turn
    physics-frame deposits into visible energy (all ones for a stack without a tune)."""
    par = _shipped(stack)
    if par is None:
        return torch.ones_like(energy_gev, dtype=torch.float64)
    return par.sampling_scale(energy_gev.double(), theta.double())


def parametrisation_for(stack: Stack, tune="auto") -> Parametrisation:
    """The coefficients the parametrised engine uses for ``stack``.

    ``tune``: ``"auto"`` (the shipped tune of a stack of that name, if its layers match, else
    the published coefficients with a one-line notice), ``"published"``, a path to a tune file,
    or a :class:`~pcshower.simulate.gflash.Parametrisation`.
    """
    if isinstance(tune, Parametrisation):
        return tune
    if tune is None or tune == "published":
        return PUBLISHED
    if tune == "auto":
        par = _shipped(stack)
        if par is not None:
            return par
        if stack.name not in _noticed:
            _noticed.add(stack.name)
            print(f"pcshower: notice: no Geant4 tune for stack {stack.name!r}; the parametrised "
                  "engine uses the published GFlash coefficients (fit one with 'pcshower tune')",
                  file=sys.stderr)
        return PUBLISHED
    path = Path(tune)
    if not path.is_file():
        raise TuneError(f"tune {tune!r}: expected 'auto', 'published' or a tune file, and "
                        f"{path} is not a file")
    par, record = load_tune(path)
    _check_stack(record, stack, path)
    return par


# ---------------------------------------------------------------------------------- data
def layer_energies(points: np.ndarray, ptr: np.ndarray, stack: Stack) -> np.ndarray:
    """``[n, L]`` visible energy per active layer of detector-frame showers (MeV); a point
    belongs to the active slab that contains its depth (points elsewhere are not counted)."""
    layers = sampling_layers(stack)
    front, back = layers.active_z_mm[:, 0], layers.active_z_mm[:, 1]
    z = points[:, 2].astype(np.float64)
    layer = np.searchsorted(front, z, side="right") - 1
    ok = (layer >= 0) & (z <= back[np.clip(layer, 0, None)] + 1e-6)
    n = len(ptr) - 1
    shower = np.repeat(np.arange(n), np.diff(ptr))
    out = np.zeros((n, layers.num_layers))
    np.add.at(out, (shower[ok], layer[ok]), points[ok, 3].astype(np.float64))
    return out


def _bins(values: np.ndarray, n: int) -> np.ndarray:
    """Bin index of each value in ``n`` quantile bins (ties kept together)."""
    if n <= 1 or len(values) == 0:
        return np.zeros(len(values), dtype=np.int64)
    edges = np.quantile(values, np.linspace(0, 1, n + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def _profile_stats(v: torch.Tensor, bin_of: torch.Tensor, n_bins: int):
    """Per bin: mean layer energies ``[B, L]``, mean and r.m.s. of the centre of gravity and of
    the width (in layers), mean visible energy; and, for data, their standard errors."""
    L = v.shape[1]
    idx = torch.arange(L, dtype=v.dtype)
    tot = v.sum(1).clamp_min(1e-12)
    cog = (v * idx).sum(1) / tot
    width = torch.sqrt(((v * (idx - cog[:, None]) ** 2).sum(1) / tot).clamp_min(1e-12))
    count = torch.zeros(n_bins, dtype=v.dtype).index_add_(0, bin_of, torch.ones_like(tot))

    def mean(x):
        s = torch.zeros((n_bins,) + x.shape[1:], dtype=v.dtype).index_add_(0, bin_of, x)
        return s / count.clamp_min(1.0).reshape((-1,) + (1,) * (x.ndim - 1))

    stats = {"layers": mean(v), "cog": mean(cog), "width": mean(width), "visible": mean(tot)}
    stats["cog_rms"] = torch.sqrt((mean(cog ** 2) - stats["cog"] ** 2).clamp_min(1e-12))
    stats["width_rms"] = torch.sqrt((mean(width ** 2) - stats["width"] ** 2).clamp_min(1e-12))
    err = {}
    sq = lambda x, m: torch.sqrt((mean(x ** 2) - m ** 2).clamp_min(0.0))  # noqa: E731
    n = count.clamp_min(2.0)
    err["layers"] = sq(v, stats["layers"]) / torch.sqrt(n)[:, None]
    for key, x in (("cog", cog), ("width", width), ("visible", tot)):
        err[key] = sq(x, stats[key]) / torch.sqrt(n)
    for key in ("cog_rms", "width_rms"):  # standard error of an r.m.s.: rms / sqrt(2 n)
        err[key] = stats[key] / torch.sqrt(2.0 * n)
    return stats, err


# ---------------------------------------------------------------------------------- model
def _cell_at(stack: Stack, normal_x0: np.ndarray) -> np.ndarray:
    """Sampling cell (active layer) at each depth along the stack normal in X0; -1 outside
    every cell (in front of, behind, or in passive slabs behind the last active one)."""
    slab = np.searchsorted(stack.x0_edges, normal_x0, side="right") - 1
    inside = (slab >= 0) & (slab < len(stack.slabs))
    cell_of_slab = sampling_layers(stack).cell_of_slab
    return np.where(inside, cell_of_slab[np.clip(slab, 0, len(stack.slabs) - 1)], -1)


class _LongitudinalModel:
    """Mean layer energies of model showers with fixed noise, differentiable in the coefficients."""

    def __init__(self, energy, theta, stack: Stack, repeats: int, seed: int):
        medium = stack.effective_medium()
        self.Z, self.ec = float(medium.Z), float(medium.ec_mev)
        g = torch.Generator().manual_seed(int(seed))
        e = torch.as_tensor(np.repeat(energy, repeats), dtype=torch.float64)
        th = torch.as_tensor(np.repeat(theta, repeats), dtype=torch.float64)
        self.energy, self.theta = e, th
        self.z = torch.randn((2, len(e)), dtype=torch.float64, generator=g)
        self.start_unit = torch.empty(len(e), dtype=torch.float64).exponential_(1.0, generator=g)
        cos_t = torch.cos(th)
        max_axis = float(stack.total_x0 / cos_t.min())
        k = int(math.ceil(max_axis / DEPTH_STEP_X0))
        self.depth = (torch.arange(k, dtype=torch.float64) + 0.5) * DEPTH_STEP_X0  # axis X0
        layers = sampling_layers(stack)
        cell = _cell_at(stack, (self.depth[None, :] * cos_t[:, None]).numpy())
        L = layers.num_layers
        # flat index into [showers, L + 1] (the last column collects what no layer sees)
        cell = np.where(cell >= 0, cell, L)
        self.flat = torch.as_tensor(cell + (L + 1) * np.arange(len(e))[:, None]).reshape(-1)
        self.L = L
        self.frac = torch.as_tensor(layers.sampling_fraction, dtype=torch.float64)

    def layer_energies(self, par: Parametrisation) -> torch.Tensor:
        p = gflash.shower_parameters(self.energy, self.Z, self.ec, self.z, par)
        start = self.start_unit * par.pair_length_x0
        t = self.depth[None, :] - start[:, None]
        pdf = torch.exp(gflash.gamma_log_pdf(t.clamp_min(1e-9), p.alpha[:, None], p.beta[:, None]))
        pdf = torch.where(t > 0, pdf, torch.zeros_like(pdf)) * DEPTH_STEP_X0
        n = len(self.energy)
        cells = torch.zeros(n * (self.L + 1), dtype=torch.float64).index_add_(
            0, self.flat, pdf.reshape(-1)).reshape(n, self.L + 1)[:, : self.L]
        scale = par.sampling_scale(self.energy, self.theta) * self.energy * 1000.0
        return cells * self.frac[None, :] * scale[:, None]


def _replace_values(par: Parametrisation, names, vec) -> Parametrisation:
    out, i = {}, 0
    for key in names:
        n = _LENGTHS[key]
        chunk = vec[i:i + n]
        out[key] = chunk[0] if key in _SCALARS else tuple(chunk[j] for j in range(n))
        i += n
    return replace(par, **out)


def _free(names, start: dict, fixed_zero=()):
    """Initial vector, and a mask of the coefficients the fit may move (Z slopes stay 0)."""
    vec, mask = [], []
    for key in names:
        for j, x in enumerate(start[key]):
            vec.append(float(x))
            mask.append((key, j) not in fixed_zero)
    return torch.tensor(vec, dtype=torch.float64), torch.tensor(mask)


_Z_SLOPES = {("alpha", 2), ("r_core", 3), ("r_tail", 1), ("p_core", 1), ("p_core", 3)}


def _optimise(loss_fn, x0, mask, steps: int, lr: float, progress: str | None):
    """Adam on relative steps (each coefficient moves by ``lr`` times its own scale, cosine
    decay), then the best point seen. Deterministic on CPU."""
    scale = x0.abs().clamp_min(0.05)
    u = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    best = (math.inf, x0.clone())
    first = None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=progress, unit="step", file=sys.stderr)
    for _ in range(steps):
        opt.zero_grad()
        x = x0 + torch.where(mask, u, torch.zeros_like(u)) * scale
        loss = loss_fn(x)
        if not torch.isfinite(loss):
            raise FloatingPointError("the tune's loss became non-finite; the data may hold "
                                     "empty showers or showers outside the stack")
        value = float(loss.detach())
        if first is None:
            first = value
        if value < best[0]:
            best = (value, x.detach().clone())
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3g}")
    if bar is not None:
        bar.close()
    return best[1], first, best[0]


def fit_longitudinal(detector, stack: Stack, start: Parametrisation, *, energy_bins: int = 5,
                     angle_bins: int = 3, repeats: int = 2, steps: int = 400, lr: float = 0.03,
                     seed: int = 0, progress: str | None = None) -> tuple[Parametrisation, dict]:
    """Fit the longitudinal and sampling coefficients to detector-frame showers ``(energy [n]
    GeV, theta_local [n] rad, layer energies [n, L] MeV)``; see the module docstring."""
    energy, theta, v = detector
    bin_of = torch.as_tensor(_bins(energy, energy_bins) * angle_bins + _bins(theta, angle_bins))
    n_bins = energy_bins * angle_bins
    data, err = _profile_stats(torch.as_tensor(v, dtype=torch.float64), bin_of, n_bins)
    model = _LongitudinalModel(energy, theta, stack, repeats, seed)
    model_bin = bin_of.repeat_interleave(repeats)
    names = _LONGITUDINAL
    x0, mask = _free(names, _values_of(start), _Z_SLOPES)
    present = torch.zeros(n_bins, dtype=torch.bool)
    present[bin_of] = True
    # keeps the errors of empty layers and one-shower bins finite
    floor = {k: 1e-3 * data[k][present].abs().mean() + 1e-12 for k in data}

    def loss_fn(x):
        par = _replace_values(start, names, x)
        stats, _ = _profile_stats(model.layer_energies(par), model_bin, n_bins)
        chi2, terms = 0.0, 0
        for key in data:
            d = ((stats[key] - data[key]) / (err[key] + floor[key]))[present]
            chi2 = chi2 + (d ** 2).sum()
            terms += d.numel()
        return chi2 / terms

    x, before, after = _optimise(loss_fn, x0, mask, steps, lr, progress)
    par = _replace_values(start, names, [float(a) for a in x])
    return par, {"chi2_per_term_published": before, "chi2_per_term": after,
                 "bins": int(present.sum()), "showers": int(len(energy)), "repeats": repeats,
                 "steps": steps}


def _radial_hist(r, rho, e_bin, w, r_edges, rho_edges, n_e):
    """Energy fractions in (energy bin, depth bin, radius bin), normalised per (energy, depth)
    (points beyond the last radius edge are not counted, as the model's cut profile), and the
    share of each (energy, depth) bin in its energy bin's energy."""
    inside = r < r_edges[-1]
    r, rho, e_bin, w = r[inside], rho[inside], e_bin[inside], w[inside]
    ri = np.clip(np.searchsorted(r_edges, r, side="right") - 1, 0, len(r_edges) - 2)
    di = np.clip(np.searchsorted(rho_edges, rho, side="right") - 1, 0, len(rho_edges) - 2)
    h = np.zeros((n_e, len(rho_edges) - 1, len(r_edges) - 1))
    np.add.at(h, (e_bin, di, ri), w)
    depth = h.sum(2, keepdims=True)
    share = depth / np.maximum(depth.sum(1, keepdims=True), 1e-30)
    return h / np.maximum(depth, 1e-30), share


#: Radius bins (R_M) and depth bins (over the shower's centre of gravity) of the radial fit.
R_EDGES_RM = np.concatenate([[0.0], np.geomspace(0.1, MAX_RADIUS_RM, 19)])
RHO_EDGES = np.array([0.0, 0.4, 0.7, 1.0, 1.3, 1.7, 2.5, 100.0])


def fit_radial(detector, stack: Stack, start: Parametrisation, *, energy_bins: int = 3,
               showers_per_bin: int = 300, spot_scale: float = 0.01, steps: int = 100,
               lr: float = 0.03, seed: int = 0, max_radius_rm: float | None = MAX_RADIUS_RM,
               progress: str | None = None) -> tuple[Parametrisation, dict]:
    """Fit the radial coefficients to detector-frame showers ``(energy [n] GeV, theta_local
    [n], phi_local [n] rad, points [P, 4] mm/MeV, ptr [n+1])`` with the longitudinal
    coefficients of ``start``; see the module docstring.

    Data and model are compared as the detector sees them: a point's radius is its distance
    from the shower axis over R_M,eff, its depth the radiation lengths the axis has crossed to
    its depth, both weighted by visible energy. Model showers take the conditions of data
    showers of their energy bin; each spot counts with its layer's sampling fraction (zero
    outside every sampling cell, e.g. behind the stack)."""
    energy, theta, phi, points, ptr = detector
    e_edges = np.quantile(energy, np.linspace(0, 1, energy_bins + 1))
    e_bin_shower = np.clip(np.searchsorted(e_edges[1:-1], energy, side="right"), 0,
                           energy_bins - 1)
    counts = np.diff(ptr)
    shower = np.repeat(np.arange(len(energy)), counts)
    w = points[:, 3].astype(np.float64)
    p = points[:, :3].astype(np.float64)
    st_, ct_ = np.sin(theta)[shower], np.cos(theta)[shower]
    d = np.stack([st_ * np.cos(phi)[shower], st_ * np.sin(phi)[shower], ct_], 1)
    along = (p * d).sum(1)
    medium = stack.effective_medium()
    r = np.linalg.norm(p - along[:, None] * d, axis=1) / medium.rm_mm
    t = np.interp(p[:, 2], stack.z_edges_mm, stack.x0_edges) / ct_
    tot = np.maximum(np.bincount(shower, w, len(energy)), 1e-30)
    cog = np.bincount(shower, w * t, len(energy)) / tot
    data, share = _radial_hist(r, t / np.maximum(cog[shower], 1e-9), e_bin_shower[shower], w,
                               R_EDGES_RM, RHO_EDGES, energy_bins)
    # model spots: the engine's own longitudinal sampling with the (tuned) coefficients
    Z = float(medium.Z)
    g = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(seed)
    # model showers at the conditions of data showers of each energy bin
    pick = np.concatenate([rng.choice(np.flatnonzero(e_bin_shower == b), showers_per_bin)
                           for b in range(energy_bins)])
    e_model = energy[pick]
    cos_model = np.cos(theta[pick])
    e_model_bin = np.repeat(np.arange(energy_bins), showers_per_bin)
    e_t = torch.as_tensor(e_model, dtype=torch.float64)
    params = gflash.sample_shower_parameters(e_t, Z, medium.ec_mev, g, start)
    n_spots = gflash.spot_count(e_t, Z, spot_scale)
    seg = torch.repeat_interleave(torch.arange(len(e_t)), n_spots)
    ts, log_w = gflash.sample_depths(params, seg, g, dtype=torch.float64)
    frac = _segment_softmax(log_w, seg, len(e_t))
    tau = ts * gflash.tau_scale(params).index_select(0, seg)
    st = torch.empty(len(e_t), dtype=torch.float64).exponential_(1.0, generator=g)
    t_abs = ts + (st * start.pair_length_x0).index_select(0, seg)
    # what the detector sees of each spot: its sampling cell's fraction (0 outside every cell)
    layers = sampling_layers(stack)
    cell = _cell_at(stack, t_abs.numpy() * cos_model[seg.numpy()])
    seen = np.where(cell >= 0, layers.sampling_fraction[np.clip(cell, 0, None)], 0.0)
    frac = frac * torch.as_tensor(seen)
    frac = frac / torch.zeros(len(e_t), dtype=torch.float64).index_add_(
        0, seg, frac).clamp_min(1e-30).index_select(0, seg)
    cog_m = torch.zeros(len(e_t), dtype=torch.float64).index_add_(0, seg, frac * t_abs)
    rho_m = (t_abs / cog_m.index_select(0, seg)).numpy()
    di = torch.as_tensor(np.clip(np.searchsorted(RHO_EDGES, rho_m, side="right") - 1, 0,
                                 len(RHO_EDGES) - 2))
    flat = torch.as_tensor(e_model_bin)[seg] * (len(RHO_EDGES) - 1) + di
    n_cells = energy_bins * (len(RHO_EDGES) - 1)
    edges2 = torch.as_tensor(R_EDGES_RM, dtype=torch.float64) ** 2
    names = _RADIAL
    x0, mask = _free(names, _values_of(start), _Z_SLOPES)
    data_t = torch.as_tensor(data)
    weight = torch.as_tensor(share) / energy_bins  # each depth bin counts by its energy
    eps = 1e-3

    def cdf(scale):
        f = edges2[None, :] / (edges2[None, :] + scale[:, None] ** 2)
        if max_radius_rm is not None:
            m2 = max_radius_rm ** 2
            f = torch.clamp(f / (m2 / (m2 + scale[:, None] ** 2)), max=1.0)
        return f

    def loss_fn(x):
        par = _replace_values(start, names, x)
        r_core, r_tail, p_core = gflash.radial_parameters(tau, e_t, Z, seg, par)
        f = p_core[:, None] * cdf(r_core) + (1.0 - p_core[:, None]) * cdf(r_tail)
        per_bin = (f[:, 1:] - f[:, :-1]) * frac[:, None]
        h = torch.zeros((n_cells, per_bin.shape[1]), dtype=torch.float64).index_add_(
            0, flat, per_bin).reshape(energy_bins, len(RHO_EDGES) - 1, -1)
        h = h / h.sum(2, keepdim=True).clamp_min(1e-30)
        # chi-square-like on the fractions: the radii that hold the energy count, the far tail
        # (where the r^-3 ansatz cannot follow Geant4's faster fall-off) little
        d2 = (h - data_t) ** 2 / (data_t + eps)
        return (weight * d2).sum()  # energy-weighted over depth bins

    x, before, after = _optimise(loss_fn, x0, mask, steps, lr, progress)
    par = _replace_values(start, names, [float(a) for a in x])
    return par, {"chi2_published": before, "chi2": after,
                 "showers": int(len(energy)), "model_showers": int(len(e_t)),
                 "spot_scale": spot_scale, "steps": steps}


#: Trial values of the sampling-fluctuation ``kappa`` (see :mod:`pcshower.physics.sampling`).
KAPPA_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)


def _resolution(energy, v, weights, n_bins: int = 3) -> np.ndarray:
    """Relative r.m.s. of the sampling-weighted layer sum over E in energy quantile bins."""
    ratio = (v * weights[None, :]).sum(1) / energy
    b = _bins(energy, n_bins)
    return np.array([ratio[b == i].std(ddof=1) / ratio[b == i].mean() for i in range(n_bins)])


def fit_crossing_rms(detector, stack: Stack, par: Parametrisation, *, particle: int = 22,
                     max_showers: int = 1500, seed: int = 0) -> tuple[float, dict]:
    """``kappa`` of the sampling fluctuations that gives the engine Geant4's energy resolution.

    ``detector = (energy [n], theta_local [n], phi_local [n], layer energies [n, L])``. The
    resolution is that of the sampling-weighted sum ``sum_l w_l E_l`` (``w_l``: the absorber X0
    in front of layer ``l`` over that of layer 0, the ILD reconstruction's weights) over E, in
    three energy bins; the engine simulates the first ``max_showers`` conditions at each
    ``kappa`` of :data:`KAPPA_GRID` with one seed, and the minimum of the summed squared
    relative differences is refined by a parabola through its neighbours."""
    from pcshower.simulate.geant4.compare import layer_weights
    from pcshower.simulate.parametrised import simulate_parametrised

    energy, theta, phi, v = (np.asarray(a)[:max_showers] for a in detector)
    w = layer_weights(stack)
    target = _resolution(energy, v, w)
    cost = []
    for kappa in KAPPA_GRID:
        sim = simulate_parametrised(energy, theta, phi, particle, stack, seed, "detector",
                                    tune=par, crossing_rms=kappa)
        mv = layer_energies(sim.points.numpy(), sim.ptr.numpy(), stack)
        cost.append(float((((_resolution(energy, mv, w) / target) - 1.0) ** 2).sum()))
    i = int(np.argmin(cost))
    kappa = KAPPA_GRID[i]
    if 0 < i < len(KAPPA_GRID) - 1:
        x, y = np.array(KAPPA_GRID[i - 1:i + 2]), np.array(cost[i - 1:i + 2])
        a, b, _ = np.polyfit(x, y, 2)
        if a > 0:
            kappa = float(np.clip(-b / (2 * a), x[0], x[2]))
    return float(kappa), {"grid": list(KAPPA_GRID), "cost": cost,
                          "geant4_resolution": target.tolist(), "showers": int(len(energy))}


def _select(showers, keep: np.ndarray):
    """``(points, ptr)`` of the showers where ``keep`` is true (numpy)."""
    counts = np.diff(showers.ptr.numpy())
    mask = np.repeat(keep, counts)
    return showers.points.numpy()[mask], np.concatenate([[0], np.cumsum(counts[keep])])


def fit_tune(detector_showers, stack: Stack, geometry=None, *, seed: int = 0,
             steps: tuple[int, int] = (400, 100),
             progress: bool = False) -> tuple[Parametrisation, dict]:
    """Fit a tune of ``stack`` to detector-frame Geant4 showers; returns the coefficients and
    the fit's statistics. ``geometry`` converts global angles to the stack's (as in the
    production); ``steps``: optimiser steps of the longitudinal and of the radial fit."""
    from pcshower.simulate.api import local_angles

    if detector_showers.frame != "detector":
        raise ValueError(f"a tune is fitted to detector-frame showers, got the "
                         f"{detector_showers.frame} frame")
    if len(detector_showers) < 10:
        raise ValueError(f"the set has {len(detector_showers)} showers; a tune needs hundreds")
    det_energy = detector_showers.energy.double().numpy()
    theta, phi = local_angles(geometry, detector_showers.theta.double().numpy(),
                              detector_showers.phi.double().numpy())
    v = layer_energies(detector_showers.points.numpy(), detector_showers.ptr.numpy(), stack)
    keep = v.sum(1) > 0
    Z = stack.effective_medium().Z
    start = _as_parametrisation(_published_for(Z), "published")
    par, long_stats = fit_longitudinal((det_energy[keep], theta[keep], v[keep]), stack, start,
                                       seed=seed, steps=steps[0],
                                       progress="tune: longitudinal" if progress else None)
    par, rad_stats = fit_radial((det_energy[keep], theta[keep], phi[keep],
                                 *_select(detector_showers, keep)),
                                stack, par, seed=seed, steps=steps[1],
                                progress="tune: radial" if progress else None)
    kappa, kappa_stats = fit_crossing_rms((det_energy[keep], theta[keep], phi[keep], v[keep]),
                                          stack, par, particle=int(detector_showers.particle[0]),
                                          seed=seed)
    return replace(par, crossing_rms=kappa, name=f"geant4-tune:{stack.name}"), {
        "seed": int(seed), "longitudinal": long_stats, "radial": rad_stats,
        "crossing_rms": kappa_stats}
