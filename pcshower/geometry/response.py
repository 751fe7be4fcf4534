"""The sampling response of a stack as Geant4 records it, for physics-frame showers made from Geant4.

Two kinds of physics-frame showers exist, and the detector must read them differently:

* **Equivalent-medium deposits** (the parametrised engine, GFlash spots): a point is energy
  deposited in the homogeneous equivalent of the stack. The detector sees a fraction of it and
  that fraction fluctuates: :func:`pcshower.physics.sampling.to_active_layers` (sampling fraction
  ``f_mip · e/mip`` per cell, Gamma-distributed crossings).
* **Recorded Geant4 deposits** (``pcshower simulate --engine geant4``, provenance
  ``physics_energy: per-cell deposit``): a point is one of Geant4's *active-layer* deposits at its
  own position, scaled by its shower's ratio of the energy deposited in that layer's sampling
  cell to the energy the active slab saw (:func:`pcshower.simulate.geant4.api.
  physics_energy_scale`). The cell-to-cell sampling fluctuations are already in the points;
  what the physics frame divided out is one number per shower and layer, ``r = visible /
  deposited``. Read with the equivalent-medium model, such showers (or a model taught by them)
  get their fluctuations drawn a second time and GFlash's sampling fraction where Geant4's is
  known: Geant4's own held-out ILD showers, placed so, keep 0.70 of their twins' hits, 0.67 of
  the energy in the first layers and 1.65 times that in the last, and a classifier separates them
  from their twins with AUC 0.997 (docs/geant4.md, "Reading recorded deposits").

``r`` is not a constant of the layer: it falls with the shower's age, Geant4's well-known
transition effect (the soft photons of a shower's late part deposit in the tungsten by the
photo-effect, which the silicon does not see: e/mip falls with depth in high-Z sampling
calorimeters, e.g. Wigmans, *Calorimetry: Energy Measurement in Particle Physics*). One ratio per
layer, applied to a shower that develops late, under-reads it, and the showers' total visible
energy spreads half as much again as Geant4's. :class:`LayerResponse` therefore holds the mean
ratio per readout layer **and shower age**, ``rho[l][t]`` with ``tau`` = the layer's deposits'
energy-weighted mean axial depth minus the shower's (X0), measured on the two frames of the same
Geant4 showers (:func:`measure_layer_response`), plus a shower-to-shower factor of relative
variance ``a / E_dep + b`` fitted so that the showers' totals keep Geant4's resolution. A
shower's layer ``l`` is read as ``visible = g · rho[l](tau_l) · deposited`` with one
``g ~ Gamma`` (mean 1) per shower and no per-point draw. The shipped responses are in
``pcshower/geometries/responses/<stack>.yaml``, measured with ``pcshower tune --response``
(recipe: docs/geant4.md); ``pcshower.generate`` and ``pcshower evaluate`` use them for models and
shower files whose provenance says ``physics_energy: per-cell deposit``
(:func:`resolve_response`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["LayerResponse", "RESPONSES_DIR", "shipped_response", "load_response", "save_response",
           "resolve_response", "DEFAULT_TAU_EDGES",
           "measure_layer_response", "response_for_provenance"]

RESPONSES_DIR = Path(__file__).resolve().parents[1] / "geometries" / "responses"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerResponse:
    """Geant4's visible/deposited ratio per readout layer of one stack, by shower age, and its
    fluctuation.

    Attributes:
        stack: stack name.
        rho: ``[L][T]`` mean visible / deposited energy of readout layer ``l`` when the layer lies
            ``tau`` X0 behind its shower's centre of gravity, ``tau`` in bin ``t`` of
            ``tau_edges`` (``T = 1``: one ratio per layer whatever the age).
        tau_edges: ``T + 1`` increasing bin edges of ``tau`` (X0 along the shower axis).
        var_a_mev: ``a`` of the relative variance ``a / E_dep + b`` of the factor common to a
            shower's layers (``E_dep`` its deposit in MeV).
        var_b: ``b`` of it.
        provenance: where it was measured (data, showers, Geant4 version, date).
        layer_var_a_mev: ``a_l`` of the relative variance ``a_l / E_l + b_l`` of the factor of
            layer ``l`` of one shower (``E_l`` the layer's deposit in MeV), one per layer (a
            single number: the same for every layer).
        layer_var_b: ``b_l`` of it.
    """

    stack: str
    rho: tuple
    tau_edges: tuple = (-1e3, 1e3)
    var_a_mev: float = 0.0
    var_b: float = 0.0
    provenance: dict = field(default_factory=dict)
    layer_var_a_mev: float | tuple = 0.0
    layer_var_b: float | tuple = 0.0

    def __post_init__(self):
        try:
            rho = np.asarray(self.rho, dtype=np.float64)
        except (TypeError, ValueError):
            rho = np.full(1, np.nan)
        if rho.ndim == 1:
            rho = rho[:, None]
        edges = np.asarray(self.tau_edges, dtype=np.float64)
        if (rho.ndim != 2 or not rho.size or not np.all(np.isfinite(rho)) or np.any(rho < 0)):
            raise ValueError(f"response of {self.stack}: rho must be a table [layers][age bins] of "
                             f"finite ratios >= 0, got {self.rho!r}")
        if edges.ndim != 1 or edges.size != rho.shape[1] + 1 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"response of {self.stack}: tau_edges must be {rho.shape[1] + 1} "
                             f"increasing edges (one more than rho's age bins), got "
                             f"{self.tau_edges!r}")
        for name in ("var_a_mev", "var_b"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"response of {self.stack}: {name} must be a finite number >= 0, "
                                 f"got {value!r}")
        for name in ("layer_var_a_mev", "layer_var_b"):
            value = getattr(self, name)
            try:
                per = np.broadcast_to(np.asarray(value, dtype=np.float64), (rho.shape[0],))
            except (TypeError, ValueError):
                per = np.full(1, np.nan)
            if not (np.all(np.isfinite(per)) and np.all(per >= 0)):
                raise ValueError(f"response of {self.stack}: {name} must be a finite number >= 0 "
                                 f"or one per layer ({rho.shape[0]}), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in per))
        object.__setattr__(self, "rho", tuple(tuple(float(v) for v in row) for row in rho))
        object.__setattr__(self, "tau_edges", tuple(float(v) for v in edges))

    @property
    def num_layers(self) -> int:
        return len(self.rho)

    def ratio(self, layer: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Mean ratio of readout layers ``layer`` at ages ``tau`` (X0): the table interpolated
        linearly between its bin centres, constant beyond the first and last centre."""
        table = torch.as_tensor(self.rho, dtype=torch.float64, device=tau.device)
        if table.shape[1] == 1:
            return table[:, 0].index_select(0, layer)
        edges = torch.as_tensor(self.tau_edges, dtype=torch.float64, device=tau.device)
        centres = 0.5 * (edges[1:] + edges[:-1])
        t = tau.double().clamp(float(centres[0]), float(centres[-1]))
        hi = torch.searchsorted(centres, t).clamp(1, len(centres) - 1)
        lo = hi - 1
        w = (t - centres[lo]) / (centres[hi] - centres[lo])
        return table[layer, lo] * (1 - w) + table[layer, hi] * w

    def visible(self, deposited: torch.Tensor, layer: torch.Tensor, batch: torch.Tensor,
                num_showers: int, depth_x0: torch.Tensor | None = None, *, fluctuate: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``[P]`` visible MeV of deposits ``deposited [P]`` (MeV) in readout layers ``layer [P]``
        (-1: none, visible 0) of showers ``batch [P]`` at axial depths ``depth_x0 [P]`` (X0; needed
        when the table has age bins): each layer of each shower is read with the ratio at its age
        ``tau`` = its deposits' energy-weighted mean depth minus its shower's, times factors of
        mean 1: a log-normal one per shower and layer (relative variance ``layer_var_a_mev / E_l
        + layer_var_b``, ``E_l`` the layer's deposit; the shower's total kept) and a Gamma one
        per shower (``var_a_mev / E_dep + var_b``)."""
        n_layers = self.num_layers
        dev, dt = deposited.device, deposited.dtype
        ok = layer >= 0
        lay = layer.clamp_min(0)
        if lay.numel() and int(lay.max()) >= n_layers:
            raise ValueError(f"the response of {self.stack} has {n_layers} layers, the stack "
                             f"{int(lay.max()) + 1}: measure it again for this stack")
        if not deposited.numel():
            return torch.zeros_like(deposited)
        key = batch.to(torch.int64) * n_layers + lay
        size = int(num_showers) * n_layers
        dep = torch.where(ok, deposited, torch.zeros_like(deposited)).to(torch.float64)
        e_layer = torch.zeros(size, dtype=torch.float64, device=dev).index_add_(0, key, dep)
        tau = torch.zeros(size, dtype=torch.float64, device=dev)
        if len(self.tau_edges) > 2:
            if depth_x0 is None:
                raise ValueError("this response has shower-age bins: give the deposits' depth_x0")
            tau = _layer_age(dep, depth_x0, key, batch, e_layer, num_showers)
        rho = self.ratio(torch.arange(size, device=dev) % n_layers, tau)
        if fluctuate and (max(self.layer_var_a_mev) > 0 or max(self.layer_var_b) > 0):
            # log-normal (mean 1): a layer of a few MeV scatters by a factor of several both ways,
            # which a Gamma of shape < 1 would turn into mostly empty layers
            a, b = (torch.as_tensor(v, dtype=torch.float64, device=dev).repeat(int(num_showers))
                    for v in (self.layer_var_a_mev, self.layer_var_b))
            var = a / e_layer.clamp_min(1e-6) + b
            sigma2 = torch.log1p(var)
            z = torch.randn(var.shape, generator=generator, dtype=torch.float64, device=dev)
            g = torch.exp(z * sigma2.sqrt() - 0.5 * sigma2).view(-1, n_layers)
            # they move energy between a shower's layers but keep its total: Geant4's layer
            # scatter is anti-correlated with the table's expectation, whose totals already have
            # Geant4's resolution (docs/geant4.md)
            expected = (e_layer * rho).view(-1, n_layers)
            g = g * (expected.sum(1) / (expected * g).sum(1).clamp_min(1e-300))[:, None]
            rho = rho * g.reshape(-1)
        if fluctuate and (self.var_a_mev > 0 or self.var_b > 0):
            from pcshower.physics.sampling import sample_gamma

            e_shower = e_layer.view(-1, n_layers).sum(1)
            shape = (1.0 / (self.var_a_mev / e_shower.clamp_min(1e-6) + self.var_b)).clamp(max=1e8)
            g = sample_gamma(shape.float(), generator).double() / shape
            rho = rho * g.repeat_interleave(n_layers)
        out = dep * rho.index_select(0, key)
        return out.to(dt)

    def to_record(self) -> dict:
        return {"pcshower_response": FORMAT_VERSION, "stack": self.stack,
                "tau_edges": list(self.tau_edges),
                "rho": [[float(f"{v:.5g}") for v in row] for row in self.rho],
                "var_a_mev": float(self.var_a_mev), "var_b": float(self.var_b),
                "layer_var_a_mev": [float(f"{v:.5g}") for v in self.layer_var_a_mev],
                "layer_var_b": [float(f"{v:.5g}") for v in self.layer_var_b],
                "provenance": dict(self.provenance)}


def _layer_age(dep, depth_x0, key, batch, e_layer, num_showers):
    """``[B * L]`` age of each (shower, layer): the layer's energy-weighted mean axial depth minus
    its shower's (X0); 0 where the layer or the shower saw nothing."""
    z = depth_x0.to(torch.float64)
    dev = dep.device
    zl = torch.zeros_like(e_layer).index_add_(0, key, dep * z)
    e_sh = torch.zeros(int(num_showers), dtype=torch.float64, device=dev).index_add_(0, batch, dep)
    z_sh = torch.zeros_like(e_sh).index_add_(0, batch, dep * z)
    cog = torch.where(e_sh > 0, z_sh / e_sh.clamp_min(1e-300), torch.zeros_like(e_sh))
    mean = torch.where(e_layer > 0, zl / e_layer.clamp_min(1e-300), torch.zeros_like(e_layer))
    n_layers = e_layer.numel() // max(int(num_showers), 1)
    age = mean - cog.repeat_interleave(n_layers)
    return torch.where(e_layer > 0, age, torch.zeros_like(age))


def load_response(path) -> LayerResponse:
    """A response file (YAML) written by :func:`save_response`; clear errors for bad files."""
    import yaml

    path = Path(path)
    try:
        record = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"response file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(record, dict) or record.get("pcshower_response") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a pcshower response file of format {FORMAT_VERSION} "
                         "(key 'pcshower_response'); write it with pcshower tune --response")
    unknown = sorted(set(record) - {"pcshower_response", "stack", "rho", "tau_edges", "var_a_mev",
                                    "var_b", "layer_var_a_mev", "layer_var_b", "provenance"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}")
    try:
        return LayerResponse(str(record["stack"]), record["rho"],
                             record.get("tau_edges", (-1e3, 1e3)), float(record["var_a_mev"]),
                             float(record["var_b"]), dict(record.get("provenance") or {}),
                             record.get("layer_var_a_mev", 0.0), record.get("layer_var_b", 0.0))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: missing or malformed entry ({err})") from None


def save_response(response: LayerResponse, path, *, overwrite: bool = False) -> Path:
    """Write ``response`` as YAML, atomically."""
    import yaml

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# Geant4 sampling response of one stack (pcshower tune --response)\n"
                   + yaml.safe_dump(response.to_record(), sort_keys=False, width=100,
                                  default_flow_style=None))
    tmp.replace(path)
    return path


def shipped_response(stack_name: str) -> LayerResponse | None:
    """The response pcshower ships for ``stack_name``, or None (read once per file version: the
    generation passes of a fast-simulation run and the batches of an evaluation all ask)."""
    path = RESPONSES_DIR / f"{stack_name}.yaml"
    return _load_cached(path, path.stat().st_mtime_ns) if path.is_file() else None


@functools.lru_cache(maxsize=32)
def _load_cached(path: Path, mtime_ns: int) -> LayerResponse:
    return load_response(path)


def response_for_provenance(info) -> bool:
    """True when a provenance record (a shower file's, or a model checkpoint's with its training
    runs) says its physics-frame energies are recorded Geant4 deposits."""
    found = False

    def walk(d):
        nonlocal found
        if isinstance(d, dict):
            if d.get("physics_energy") == "per-cell deposit":
                found = True
            for v in d.values():
                walk(v)
        elif isinstance(d, (list, tuple)):
            for v in d:
                walk(v)

    walk(info or {})
    return found


#: Default shower-age bins of a measured response (X0 of the layer behind the shower's centre of
#: gravity): 1 X0 wide from 10 X0 in front of it to 14 X0 behind it.
DEFAULT_TAU_EDGES = tuple(float(t) for t in np.arange(-10.0, 14.5, 1.0))


def measure_layer_response(physics_batches, detector_batches, geometry, *,
                           tau_edges=DEFAULT_TAU_EDGES, min_deposit_mev: float = 1.0,
                           min_bin_mev: float = 200.0, min_bin_pairs: int = 25,
                           progress: bool = False) -> LayerResponse:
    """Measure the ratio table and its fluctuation from the two frames of the same Geant4 showers.

    ``physics_batches`` and ``detector_batches`` are iterables of :class:`~pcshower.data.Showers`
    batches of the same showers in the same order (a ``--frame both`` production's ``physics/``
    and ``detector/``). Each shower's deposit per readout layer is what the geometry's placement
    puts there (ratio 1, no fluctuation), with the layer's age (its deposits' mean axial depth
    minus the shower's), and its visible energy per layer is that of its detector-frame twin on
    the same cells. ``rho[l][t]`` is the summed visible over the summed deposit of the (shower,
    layer) pairs of layer ``l`` in age bin ``t``; a bin with less than ``min_bin_mev`` deposited
    in all, or fewer than ``min_bin_pairs`` pairs, takes the value interpolated from its layer's
    filled bins (the nearest at the ends). The layer factors' relative variance ``a_l / E_l +
    b_l`` is fitted on the (robust) scatter of the pairs' ratios about the table, pairs with at
    least ``min_deposit_mev`` deposited; the shower factor on what is left of Geant4's resolution
    (:func:`_fit_shower_variance`)."""
    from itertools import zip_longest

    from tqdm.auto import tqdm

    n_layers = int(geometry.num_layers)
    unit = LayerResponse(geometry.stack.name, (1.0,) * n_layers)
    edges = np.asarray(tau_edges, dtype=np.float64)
    n_bins = len(edges) - 1
    deps, ages, viss, energies, thetas = [], [], [], [], []
    bar = tqdm(desc="response", unit="shower", disable=not progress)
    for phys, det in zip_longest(physics_batches, detector_batches):
        if phys is None or det is None:
            raise ValueError("the physics- and detector-frame data sets hold different numbers of "
                             "showers: give the two frames of one production")
        if len(phys) != len(det) or not torch.allclose(phys.energy.double(), det.energy.double()):
            raise ValueError("the physics- and detector-frame batches are not the same showers "
                             "(energies differ): give the two frames of one production")
        n = len(phys)
        placed = geometry._place(phys, None, None, False, unit)
        # the age from every deposit in the stack, the deposit from those read by a cell (as
        # the twin's visible energy is: a shower leaving the barrel's end loses both)
        ok = placed.layer >= 0
        key = placed.batch * n_layers + placed.layer.clamp_min(0)
        dep = torch.where(ok, placed.energy, torch.zeros_like(placed.energy)).double()
        e_layer = torch.zeros(n * n_layers, dtype=torch.float64).index_add_(0, key, dep)
        age = _layer_age(dep, phys.points[:, 2], key, placed.batch, e_layer, n)
        read = torch.where(placed.keep, dep, torch.zeros_like(dep))
        e_layer = torch.zeros(n * n_layers, dtype=torch.float64).index_add_(0, key, read)
        deps.append(e_layer.view(n, n_layers).numpy())
        ages.append(age.view(n, n_layers).numpy())
        viss.append(_per_layer(geometry.project(det), geometry, n_layers))
        energies.append(phys.energy.double().numpy())
        thetas.append(phys.theta.double().numpy())
        bar.update(n)
    bar.close()
    if not deps:
        raise ValueError("no showers to measure the response on")
    dep, age, vis = (np.concatenate(x) for x in (deps, ages, viss))
    tb = np.clip(np.digitize(age, edges) - 1, 0, n_bins - 1)
    table = np.zeros((n_layers, n_bins))
    centres = 0.5 * (edges[1:] + edges[:-1])
    for layer in range(n_layers):
        d_sum = np.bincount(tb[:, layer], weights=dep[:, layer], minlength=n_bins)
        v_sum = np.bincount(tb[:, layer], weights=vis[:, layer], minlength=n_bins)
        pairs = np.bincount(tb[:, layer], weights=(dep[:, layer] > 0).astype(float),
                            minlength=n_bins)
        filled = (d_sum >= min_bin_mev) & (pairs >= min_bin_pairs)
        if not filled.any():
            total = dep[:, layer].sum()
            table[layer] = vis[:, layer].sum() / total if total > 0 else 0.0
            continue
        table[layer] = np.interp(centres, centres[filled], v_sum[filled] / d_sum[filled])
    # closure: the table is read by linear interpolation in age (LayerResponse.ratio), not bin by
    # bin; each layer's row is scaled so that, read so, the fit showers' summed visible energy
    # per layer is Geant4's (a few percent in the first and last layers, where the age
    # distribution is steep within a bin)
    layers = torch.arange(n_layers).repeat(len(dep))
    read = LayerResponse(geometry.stack.name, table, edges).ratio(
        layers, torch.as_tensor(age.reshape(-1))).numpy().reshape(dep.shape)
    e_sum = (dep * read).sum(0)
    closure = np.divide(vis.sum(0), e_sum, out=np.ones(n_layers), where=e_sum > 0)
    table = table * closure[:, None]
    expected = dep * read * closure[None, :]
    # the layer factor: the scatter of each (shower, layer)'s ratio about the table; the shower
    # factor: whatever of Geant4's resolution the table and the layer factors leave
    # per layer: the all-layer form a / E_l + b times a factor k_l fitted on the layer's own
    # pairs. At the same deposit the scatter differs ~10x between ILD's first and last layers
    # (docs/geant4.md); one factor a layer keeps the fit stable on a narrow range of E_l.
    sel = (dep >= min_deposit_mev) & (expected > 0)
    ratio = np.divide(vis, expected, out=np.zeros_like(vis), where=sel)
    a_all, b_all = _fit_pair_variance(dep[sel], ratio[sel])
    scale = [_layer_scale(dep[sel[:, l], l], ratio[sel[:, l], l], a_all, b_all)
             for l in range(n_layers)]
    la, lb = tuple(k * a_all for k in scale), tuple(k * b_all for k in scale)
    a, b = _fit_shower_variance(dep, expected, vis.sum(1), np.concatenate(energies),
                                np.concatenate(thetas))
    return LayerResponse(geometry.stack.name, table, edges, a, b,
                         {"showers": int(len(dep)), "pairs_in_layer_fit": int(sel.sum()),
                          "min_deposit_mev": float(min_deposit_mev),
                          "min_bin_mev": float(min_bin_mev), "min_bin_pairs": int(min_bin_pairs)},
                         la, lb)


def _binned_scatter(deposit: np.ndarray, ratio: np.ndarray, bins: int):
    """``(mean 1 / deposit, robust variance of ratio)`` per quantile bin of the deposit (bins of
    more than 10 pairs): the points the variance fits below are made of."""
    edges = np.quantile(deposit, np.linspace(0, 1, bins + 1))
    x, y = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (deposit >= lo) & (deposit <= hi)
        if m.sum() > 10:
            x.append(np.mean(1.0 / deposit[m]))
            y.append(_robust_var(ratio[m]))
    return np.asarray(x), np.asarray(y)


def _fit_pair_variance(deposit: np.ndarray, ratio: np.ndarray, bins: int = 20) -> tuple[float, float]:
    """``(a, b) >= 0`` of ``var(ratio) = a / deposit + b`` for the (shower, layer) ratios about
    the table: least squares on the ratio's (robust, :func:`_robust_var`) variance in quantile
    bins of the deposit, with the bin's mean of ``1 / deposit`` as regressor."""
    if ratio.size < 4 * bins:
        raise ValueError(f"{ratio.size} (shower, layer) pairs are too few to fit the fluctuation")
    return _nonnegative_line(*_binned_scatter(deposit, ratio, bins))


def _layer_scale(deposit: np.ndarray, ratio: np.ndarray, a: float, b: float,
                 bins: int = 10) -> float:
    """Least-squares ``k >= 0`` of ``var(ratio) = k (a / deposit + b)`` on one layer's pairs
    (quantile bins of the deposit); 1 with fewer than 100 pairs."""
    if ratio.size < 100 or (a <= 0 and b <= 0):
        return 1.0
    inv, y = _binned_scatter(deposit, ratio, bins)
    x = a * inv + b
    return float(max(np.sum(x * y) / np.sum(x * x), 0.0)) if np.sum(x * x) > 0 else 1.0


def _robust_var(ratio: np.ndarray) -> float:
    """Relative variance of the log-normal whose log has the interquartile range of
    ``log(ratio)`` (``sigma = IQR / 1.349``): the bulk of the scatter, not a few outliers (ILD's
    last layers have rare ratios 20x their mean, which a plain variance turns into a far too
    broad factor for every shower)."""
    with np.errstate(divide="ignore"):
        q1, q3 = np.quantile(np.log(ratio), [0.25, 0.75])
    if not (np.isfinite(q1) and np.isfinite(q3)):
        return float(np.var(ratio, ddof=1))
    return float(np.expm1(((q3 - q1) / 1.349) ** 2))


def _nonnegative_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(a, b) >= 0`` of ``y = a x + b``."""
    a, b = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)[0]
    if b < 0:
        a, b = float(max(np.sum(x * y) / np.sum(x * x), 0.0)), 0.0
    elif a < 0:
        a, b = 0.0, float(max(np.mean(y), 0.0))
    return float(a), float(b)


def _fit_shower_variance(dep: np.ndarray, expected: np.ndarray, visible: np.ndarray,
                         energy: np.ndarray, theta: np.ndarray) -> tuple[float, float]:
    """``(a, b) >= 0`` of the shower factor's relative variance ``a / E_dep + b`` that gives the
    showers' total visible energy Geant4's resolution, condition by condition.

    The table's expectation ``X = sum_l X_l`` of a shower already varies from shower to shower
    with its development, and the layer factors keep each shower's total. In bins of incident
    energy and angle the excess ``var(V / E) / mean(V / E)^2 - var(X / E) / mean(X / E)^2`` of
    Geant4's total ``V`` is fitted by ``a mean(1 / E_dep) + b``. On Geant4 ILD showers
    (docs/geant4.md) the table alone has Geant4's resolution and the fit gives 0: the scatter of
    the layer ratios is anti-correlated with the table's expectation. (Independent layer factors
    that did add to the total overshot Geant4's resolution at 10-30 GeV by 20 %.)"""
    total = expected.sum(1)
    ok = total > 0
    if ok.sum() < 60:
        raise ValueError(f"{int(ok.sum())} showers with visible energy are too few to fit the "
                         "fluctuation (60 at least)")
    dep, visible, energy, theta, total = (x[ok] for x in (dep, visible, energy, theta, total))
    e_dep = dep.sum(1)
    n_e = int(np.clip(len(total) // 150, 1, 8))
    n_t = 3 if len(total) >= 600 and np.ptp(theta) > 1e-3 else 1
    e_bin = np.clip(np.searchsorted(np.quantile(energy, np.linspace(0, 1, n_e + 1))[1:-1], energy,
                                    side="right"), 0, n_e - 1)
    t_bin = np.clip(np.searchsorted(np.quantile(theta, np.linspace(0, 1, n_t + 1))[1:-1], theta,
                                    side="right"), 0, n_t - 1)
    x, y = [], []
    for k in range(n_e * n_t):
        m = (e_bin * n_t + t_bin) == k
        if m.sum() < 20:
            continue
        v, xx = visible[m] / energy[m], total[m] / energy[m]
        y.append(np.var(v, ddof=1) / np.mean(v) ** 2 - np.var(xx, ddof=1) / np.mean(xx) ** 2)
        x.append(np.mean(1.0 / e_dep[m]))
    return _nonnegative_line(np.asarray(x), np.asarray(y))


def _per_layer(hits, geometry, n_layers: int) -> np.ndarray:
    lay = torch.as_tensor(geometry.cell_layer(hits.cell_id.to(torch.int64))).to(torch.int64)
    b = torch.repeat_interleave(torch.arange(len(hits)), torch.diff(hits.ptr))
    out = torch.zeros(len(hits) * n_layers, dtype=torch.float64)
    out.index_add_(0, b * n_layers + lay, hits.energy.double())
    return out.view(len(hits), n_layers).numpy()


#: Stacks whose missing response was already warned about (once per stack and process).
_MISSING_WARNED: set = set()


def resolve_response(spec, provenance, geometry) -> tuple[LayerResponse | None, str]:
    """The response to read physics-frame showers with in ``geometry``, and a label for metadata.

    ``spec``: ``"auto"`` (the stack's shipped response when ``provenance`` says the showers, or
    the model's training showers, are recorded Geant4 deposits; else the equivalent-medium
    sampling model), ``"sampling"`` or None (the sampling model), a :class:`LayerResponse`, or the
    path of a response file."""
    import warnings

    if spec is None or (isinstance(spec, str) and spec == "sampling"):
        return None, "equivalent-medium sampling model"
    if isinstance(spec, str) and spec == "auto":
        if not response_for_provenance(provenance):
            return None, "equivalent-medium sampling model"
        found = shipped_response(geometry.stack.name)
        if found is None:
            if geometry.stack.name not in _MISSING_WARNED:
                _MISSING_WARNED.add(geometry.stack.name)
                warnings.warn(f"these showers are recorded Geant4 deposits (or a model taught by "
                              f"them), but pcshower has no measured Geant4 response for the stack "
                              f"{geometry.stack.name!r}: they are read with the equivalent-medium "
                              "sampling model, which draws the sampling fluctuations a second "
                              "time (about 30 % of ILD's hits lost). Measure one with 'pcshower "
                              "tune --response' and pass it (docs/geant4.md)", stacklevel=4)
            return None, "equivalent-medium sampling model (no Geant4 response for this stack)"
        response, label = found, f"Geant4 layer response shipped for {geometry.stack.name}"
    elif isinstance(spec, LayerResponse):
        response, label = spec, f"Geant4 layer response of {spec.stack}"
    elif isinstance(spec, (str, Path)):
        response, label = load_response(spec), f"Geant4 layer response {Path(spec).name}"
    else:
        raise TypeError(f"response must be 'auto', 'sampling', None, a LayerResponse or a file "
                        f"path, got {type(spec).__name__}")
    if response.stack != geometry.stack.name or response.num_layers != geometry.num_layers:
        raise ValueError(f"the response was measured for the stack {response.stack!r} "
                         f"({response.num_layers} readout layers), not {geometry.name}'s "
                         f"{geometry.stack.name!r} ({geometry.num_layers} readout layers)")
    return response, label
