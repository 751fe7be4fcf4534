"""`ShowerModel`: ShowerFlow for the global shape plus a point network (EPiC or set-transformer
backbone) trained with one of the objectives of :mod:`pcshower.models.objectives` (EDM
diffusion, flow matching, consistency).

Everything a trained model needs at generation time lives in this module's state: network
weights and the feature normalisation (buffers of :class:`Normalization`), so one checkpoint
file restores it (see :mod:`pcshower.models.checkpoint`). The model works in the physics frame
(x, y in Molière radii, z in X0, e as fraction of the incident energy).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from pcshower.data.showers import Showers
from pcshower.models.calibration import calibrate_points
from pcshower.models.objectives import EDM, build_objective
from pcshower.models.showerflow import ShapeCodec, ShowerFlow, ShowerShape, slice_edges
from pcshower.models.split import (SPREAD_R_EDGES, SPREAD_Z_EDGES, declump_points,
                                   measure_voxel_spread, split_points, spread_boxes)
from pcshower.nn.epic import EPiCNetwork
from pcshower.nn.transformer import SetTransformer

__all__ = ["ShowerModel", "DEFAULT_MODEL_CONFIG", "merge_config", "split_points"]

#: Model hyper-parameters; a YAML config's ``model:`` section overrides any of them.
DEFAULT_MODEL_CONFIG = {
    # depth slices of width z_max_x0 / num for the flow's per-slice energies and point counts;
    # centred: slice k centred on depth k * width (the depths of points merged on voxels of
    # that depth, see showerflow.slice_edges) rather than starting there
    "slices": {"num": 30, "z_max_x0": 30.0, "centred": False},
    "fraction_eps": 1.0e-3,
    # dequantise the exact-zero slice/ring fractions in training (uniform over [0, eps), see
    # ShapeCodec.dequantize_zeros) and decode fractions below eps as zero; use a small
    # fraction_eps (1e-5) with it, the box decodes to at most eps
    "fraction_dequantize": False,
    # inner edges (R_M) of rings about the axis whose energy fractions the flow samples and the
    # calibration matches (CaloClouds' per-layer calibration, extended to the radial direction);
    # None: no rings
    "rings": None,
    # calibration step (3): None moves each shower's transverse centre of gravity to the flow's;
    # a radius (R_M) centres the energy within it on the axis instead (calibration.py)
    "core_radius": None,
    # then each depth slice's energy within this radius (R_M) centred on the axis too (needs
    # core_radius); None: slices move with their shower
    "slice_core_radius": None,
    # passes: None = fully autoregressive (sampling costs one network pass per feature);
    # 2 = coupling layers (two passes: fast sampling), see ShowerFlow
    "flow": {"transforms": 4, "hidden": [128, 128], "bins": 8, "passes": None},
    # shape_embed: width of a per-shower embedding of the shower's standardised shape features
    # (the flow's vector: the true shape in training, the flow's sample in generation) appended
    # to the point network's conditioning; 0: the network sees only E, angles, N and sigma
    "epic": {"point_dim": 64, "global_dim": 16, "hidden": 128, "layers": 3, "sum_scale": 100.0,
             "shape_embed": 0},
    # the point network's backbone: "epic" (section epic) or "transformer" (section transformer:
    # induced-set attention with adaLN, pcshower/nn/transformer.py)
    "backbone": "epic",
    "transformer": {"dim": 64, "heads": 4, "layers": 3, "inducing": 32, "mlp_ratio": 2.0},
    # the point network's training objective and its sampler (pcshower/models/objectives/):
    # "edm" (samplers heun, euler), "flow_matching" (euler, midpoint, heun) or "consistency"
    # (multistep; noise range and schedule from the edm section, those of its EDM teacher)
    "objective": "edm",
    "edm": {"sigma_data": 1.0, "p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002,
            "sigma_max": 80.0, "rho": 7.0},
    "flow_matching": {"sigma_min": 1.0e-4, "time": "uniform", "logit_mean": 0.0, "logit_std": 1.0},
    "consistency": {"bins": 18, "mode": "distillation", "target_decay": 0.0},
    "sampler": "heun",
    "steps": 16,
    "max_points": 4096,
    # transverse feature warp: the network sees r' = s asinh(r / s) instead of r (x, y scaled
    # alike), s in R_M; expands the dense core and compresses the sparse tail. None: no warp.
    "radial_scale": None,
    # generation-time split of every point into `factor` sub-points of equal energy, spread
    # uniformly over a box about it: undoes the loss of within-voxel spread of training data
    # merged on the grid `box` = [dx, dy, dz] (R_M, R_M, X0). spread: false uses that box for
    # every point; true looks the box up per point in a table measured on finer data
    # (ShowerModel.fit_split_spread, `pcshower fit-split`; pcshower/models/split.py).
    # snap_depth: true puts every calibrated point at the mean depth of the training points in
    # its slice (measured with the spread table): for slices centred on the grid's depth planes,
    # which the training points lie on and the network does not resolve.
    # declump: true moves calibrated points that share a training-grid voxel (`box`) with
    # another point of their shower along the circle about the axis to a free voxel (the
    # training data hold one point per voxel; split.declump_points)
    # spread_key: "centroid" bins the spread table by the radius of each training voxel's
    # centroid and looks points up by their own radius; "voxel" by the radius of the voxel's
    # centre, for points and table alike (split.measure_voxel_spread)
    "split": {"factor": 1, "box": None, "spread": False, "snap_depth": False, "declump": False,
              "spread_key": "centroid"},
}

COND_DIM = 4  # ln E, theta, cos phi, sin phi (standardised)


#: Network sizes that must be whole numbers of at least the value given (model config keys).
_MIN_SIZES = {("epic", "point_dim"): 1, ("epic", "global_dim"): 1, ("epic", "hidden"): 1,
              ("epic", "layers"): 1, ("flow", "transforms"): 1, ("transformer", "dim"): 1,
              ("transformer", "heads"): 1, ("transformer", "layers"): 1,
              ("transformer", "inducing"): 1,
              ("flow", "bins"): 2, ("steps",): 1, ("max_points",): 1}


def check_sizes(cfg: dict) -> None:
    """Refuse network sizes that would build a broken network (negative widths, no layers)."""
    for keys, least in _MIN_SIZES.items():
        value = cfg
        for k in keys:
            value = value[k]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"model config {'.'.join(keys)} must be a whole number >= {least}, "
                             f"got {value!r}")
    hidden = cfg["flow"]["hidden"]
    if not isinstance(hidden, list) or not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ValueError(f"model config flow.hidden must be a non-empty list of whole numbers "
                         f">= 1, got {hidden!r}")


def merge_config(base: dict, override: dict | None) -> dict:
    """Recursive dict update that rejects keys the base does not know (typos fail loudly)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in out:
            raise ValueError(f"unknown model config key {key!r}; known keys: {sorted(out)}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"model config key {key!r} must be a mapping, got {value!r}")
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


class Normalization(nn.Module):
    """Feature statistics measured on the training set (buffers, saved in the checkpoint)."""

    def __init__(self, shape_features: int):
        super().__init__()
        self.register_buffer("shape_mean", torch.zeros(shape_features))
        self.register_buffer("shape_std", torch.ones(shape_features))
        self.register_buffer("point_mean", torch.zeros(4))
        self.register_buffer("point_std", torch.ones(4))
        # ln E mean/std, theta mean/std, ln N mean/std
        self.register_buffer("cond_stats", torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
        # energy min/max [GeV], theta min/max [rad] seen in training
        self.register_buffer("ranges", torch.tensor([0.0, math.inf, 0.0, math.pi]))


#: The default of :attr:`ShowerModel.chunk_points` (docs/benchmarks.md).
DEFAULT_CHUNK_POINTS = 4096


class ShowerModel(nn.Module):
    """Flow + point diffusion model. Build with a config dict (see ``DEFAULT_MODEL_CONFIG``),
    call :meth:`fit_normalization` on training showers, train with :meth:`flow_loss` and
    :meth:`point_loss`, and sample physics-frame showers with :meth:`sample`."""

    #: Points per network pass when sampling (whole showers; ``None``: the whole batch at once).
    #: Measured in docs/benchmarks.md ("chunked network passes"); it changes no number.
    chunk_points: int | None = DEFAULT_CHUNK_POINTS

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = merge_config(DEFAULT_MODEL_CONFIG, config)
        check_sizes(self.config)
        cfg = self.config
        sl = cfg["slices"]
        edges = slice_edges(int(sl["num"]), float(sl["z_max_x0"]), bool(sl["centred"]))
        self.codec = ShapeCodec(edges, cfg["fraction_eps"], cfg["rings"],
                                 dequantize_zeros=bool(cfg["fraction_dequantize"]))
        self.edm = EDM(**cfg["edm"])
        self.objective = build_objective(cfg)
        if cfg["sampler"] not in self.objective.samplers:
            raise ValueError(f"model config sampler {cfg['sampler']!r} does not fit objective "
                             f"{self.objective.name!r}; its samplers: {list(self.objective.samplers)}")
        self.norm = Normalization(self.codec.num_features)
        fc = cfg["flow"]
        self.flow = ShowerFlow(self.codec.num_features, COND_DIM, transforms=int(fc["transforms"]),
                               hidden=tuple(fc["hidden"]), bins=int(fc["bins"]),
                               passes=None if fc["passes"] is None else int(fc["passes"]))
        ec = cfg["epic"]
        width = int(ec["shape_embed"])
        if width < 0:
            raise ValueError(f"epic.shape_embed must be >= 0 (0: off), got {width}")
        # conditioning the points on the flow's shape: the calibration then deals the network's
        # points to the slices it was asked for, instead of a profile it chose itself (measured
        # for the default model: no better, docs/models.md version 6)
        self.shape_embed = None if width == 0 else nn.Sequential(
            nn.Linear(self.codec.num_features, 4 * width), nn.LeakyReLU(0.01),
            nn.Linear(4 * width, width))
        cond_dim = COND_DIM + 2 + width  # conditions, time feature, ln N, shape embedding
        if cfg["backbone"] == "epic":
            self.points_net = EPiCNetwork(4, 4, cond_dim, point_dim=int(ec["point_dim"]),
                                          global_dim=int(ec["global_dim"]), hidden=int(ec["hidden"]),
                                          layers=int(ec["layers"]), sum_scale=float(ec["sum_scale"]))
        elif cfg["backbone"] == "transformer":
            tc = cfg["transformer"]
            self.points_net = SetTransformer(4, 4, cond_dim, dim=int(tc["dim"]),
                                             heads=int(tc["heads"]), layers=int(tc["layers"]),
                                             inducing=int(tc["inducing"]),
                                             mlp_ratio=float(tc["mlp_ratio"]))
        else:
            raise ValueError(f"model config backbone must be 'epic' or 'transformer', got "
                             f"{cfg['backbone']!r}")
        sc = cfg["split"]
        if sc["spread"]:
            if sc["box"] is None or int(sc["factor"]) < 2:
                raise ValueError("split.spread needs the training grid in split.box and a split "
                                 "factor of at least 2")
            dx, _, dz = (float(v) for v in sc["box"])
            table = torch.empty(len(SPREAD_R_EDGES) - 1, len(SPREAD_Z_EDGES) - 1, 2)
            table[..., 0], table[..., 1] = dx, dz  # the uniform voxel box until measured
            self.register_buffer("split_spread", table)
            # showers the table was measured on (0: not measured, the uniform box is used)
            self.register_buffer("split_spread_showers", torch.tensor(0, dtype=torch.int64))
        if cfg["slice_core_radius"] is not None and cfg["core_radius"] is None:
            raise ValueError("slice_core_radius needs core_radius (the shower's core is centred "
                             "first)")
        if sc["spread_key"] not in ("centroid", "voxel"):
            raise ValueError(f"split.spread_key must be 'centroid' or 'voxel', got "
                             f"{sc['spread_key']!r}")
        if sc["declump"] and sc["box"] is None:
            raise ValueError("split.declump needs the training grid in split.box")
        if sc["snap_depth"]:
            width = float(sl["z_max_x0"]) / int(sl["num"])
            if not (sc["spread"] and sl["centred"] and math.isclose(width, float(sc["box"][2]))):
                raise ValueError("split.snap_depth needs a measured split (split.spread) and depth "
                                 "slices centred on the training grid's planes (slices.centred, "
                                 f"slice width {width} X0 = the grid's dz {sc['box'][2]})")
            # the slices' middles until measured with the spread table
            self.register_buffer("slice_depth", 0.5 * (edges[:-1] + edges[1:]))

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_normalization(self, showers: Showers) -> None:
        """Measure feature means/standard deviations and condition ranges on physics-frame
        training showers."""
        self.set_normalization(self.normalization_sums(showers))

    def normalization_sums(self, showers: Showers, shape=None) -> dict[str, torch.Tensor]:
        """The float64 sums (counts, sums, sums of squares) and extremes that
        :meth:`set_normalization` turns into the normalisation: additive over parts of a data
        set (streamed row groups, the ranks of a distributed run: add the ``sum_*`` entries,
        take the min/max of ``min_*``/``max_*``). ``shape``: the showers' measured shape, if
        already at hand."""
        _check_physics(showers)
        shape = self.codec.measure_showers(showers) if shape is None else shape
        y = self.codec.encode(shape).double()
        f1 = f2 = torch.zeros(4, dtype=torch.float64)
        # point features: over chunks of points (no [P, 4] copy of all points)
        for part in showers.points.split(1 << 22):
            f = self._point_features_raw(part).double()
            f1, f2 = f1 + f.sum(0), f2 + (f * f).sum(0)
        c = torch.stack([showers.energy.log().float(), showers.theta.float(),
                         shape.num_points.float().clamp(min=1).log()], 1).double()
        d = torch.float64
        return {"sum_showers": torch.tensor(float(len(showers)), dtype=d),
                "sum_points": torch.tensor(float(showers.total_points), dtype=d),
                "sum_shape": y.sum(0), "sum_shape2": (y * y).sum(0),
                "sum_point": f1, "sum_point2": f2, "sum_cond": c.sum(0), "sum_cond2": (c * c).sum(0),
                "min_cond": torch.tensor([float(showers.energy.min()), float(showers.theta.min())],
                                         dtype=d),
                "max_cond": torch.tensor([float(showers.energy.max()), float(showers.theta.max())],
                                         dtype=d)}

    def set_normalization(self, sums: dict[str, torch.Tensor]) -> None:
        """Set the normalisation from :meth:`normalization_sums` (of the whole training set)."""
        def mean_std(s1, s2, n):
            mean = s1 / n
            return mean, ((s2 - n * mean * mean) / max(n - 1, 1)).clamp(min=0).sqrt()

        n = float(sums["sum_showers"])
        mean, std = mean_std(sums["sum_shape"], sums["sum_shape2"], n)
        self.norm.shape_mean.copy_(mean.float())
        self.norm.shape_std.copy_(std.float().clamp(min=1e-3))
        mean, std = mean_std(sums["sum_point"], sums["sum_point2"], max(float(sums["sum_points"]), 2))
        self.norm.point_mean.copy_(mean.float())
        self.norm.point_std.copy_(std.float().clamp(min=1e-3))
        mean, std = mean_std(sums["sum_cond"], sums["sum_cond2"], n)
        std = std.clamp(min=1e-2)
        self.norm.cond_stats.copy_(torch.stack([mean[0], std[0], mean[1], std[1], mean[2],
                                                std[2]]).float())
        lo, hi = sums["min_cond"], sums["max_cond"]
        self.norm.ranges.copy_(torch.stack([lo[0], hi[0], lo[1], hi[1]]).float())

    @property
    def energy_range(self) -> tuple[float, float]:
        return float(self.norm.ranges[0]), float(self.norm.ranges[1])

    @property
    def theta_range(self) -> tuple[float, float]:
        return float(self.norm.ranges[2]), float(self.norm.ranges[3])

    def _point_features_raw(self, points: torch.Tensor) -> torch.Tensor:
        xy = points[:, :2]
        s = self.config["radial_scale"]
        if s is not None:
            r = torch.hypot(xy[:, 0], xy[:, 1])[:, None]
            xy = xy * _asinh_ratio(r / s)
        return torch.cat([xy, points[:, 2:3], points[:, 3:4].clamp(min=1e-12).log()], 1)

    def normalize_points(self, points: torch.Tensor) -> torch.Tensor:
        return (self._point_features_raw(points) - self.norm.point_mean) / self.norm.point_std

    def denormalize_points(self, x: torch.Tensor) -> torch.Tensor:
        p = x * self.norm.point_std + self.norm.point_mean
        xy = p[:, :2]
        s = self.config["radial_scale"]
        if s is not None:  # invert r' = s asinh(r / s): r = s sinh(r' / s)
            r_warp = torch.hypot(xy[:, 0], xy[:, 1])[:, None]
            xy = xy * _sinh_ratio(r_warp / s)
        return torch.cat([xy, p[:, 2:3], p[:, 3:4].clamp(max=0.0).exp()], 1)

    def condition(self, energy: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``[B, 4]`` standardised conditioning vector from GeV / rad conditions."""
        c = self.norm.cond_stats
        dev = c.device
        energy, theta, phi = (torch.as_tensor(v, device=dev).float() for v in (energy, theta, phi))
        return torch.stack([(energy.log() - c[0]) / c[1], (theta - c[2]) / c[3], phi.cos(),
                            phi.sin()], 1)

    # ------------------------------------------------------------------ losses
    def flow_loss(self, shape_y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per feature of standardised shape features."""
        y = (shape_y - self.norm.shape_mean) / self.norm.shape_std
        return -self.flow.log_prob(y, cond).mean() / y.shape[1]

    def shape_context(self, shape: ShowerShape) -> torch.Tensor | None:
        """``[B, F]`` standardised shape features the point network is conditioned on (``None``
        for a model without ``epic.shape_embed``)."""
        if self.shape_embed is None:
            return None
        return (self.codec.encode(shape) - self.norm.shape_mean) / self.norm.shape_std

    def network(self, cond: torch.Tensor, batch: torch.Tensor, counts: torch.Tensor,
                shape_y: torch.Tensor | None = None, chunk_points: int | None = None):
        """The raw point network as the objectives call it, ``net(x_in [P, 4], t [B])``, for
        showers with conditions ``cond``, point index ``batch`` and point counts ``counts``;
        ``shape_y`` the :meth:`shape_context` (required with ``epic.shape_embed``).
        ``chunk_points``: run the per-point layers in chunks of about that many points
        (inference with an EPiC backbone: the same numbers as one pass)."""
        ln_n = (counts.float().clamp(min=1).log() - self.norm.cond_stats[4]) / self.norm.cond_stats[5]
        after = [ln_n[:, None]]  # the conditioning vector: cond, time, ln N[, shape embedding]
        if self.shape_embed is not None:
            if shape_y is None:
                raise ValueError("this model's point network is conditioned on the shower shape "
                                 "(epic.shape_embed): pass shape_y")
            after.append(self.shape_embed(shape_y.to(cond.dtype)))

        # chunked passes where the backbone has them (EPiC): the same numbers, less memory
        # traffic (docs/benchmarks.md)
        extra = {"chunk_points": int(chunk_points)} if chunk_points and isinstance(
            self.points_net, EPiCNetwork) else {}

        def net(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            full = torch.cat([cond, t[:, None].to(x_in.dtype), *after], 1)
            return self.points_net(x_in, full, batch, counts, **extra)

        return net

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                batch: torch.Tensor, counts: torch.Tensor,
                shape_y: torch.Tensor | None = None) -> torch.Tensor:
        """EDM denoiser :math:`D(x;\\sigma)` on normalised points (an EDM model, or the teacher
        of a distilled one); ``sigma`` per shower ``[B]``."""
        if self.objective.name != "edm":
            raise ValueError(f"denoise() is the EDM denoiser; this model's objective is "
                             f"{self.objective.name!r}")
        return self.edm.denoise(self.network(cond, batch, counts, shape_y), x, sigma, batch)

    def point_loss(self, showers: Showers, cond: torch.Tensor,
                   generator: torch.Generator | None = None,
                   sigma: float | torch.Tensor | None = None, *, teacher: ShowerModel | None = None,
                   target: ShowerModel | None = None) -> torch.Tensor:
        """The objective's loss on the points of a batch of training showers (mean over points).
        ``sigma`` (EDM only): the noise level per shower or one for all, instead of drawn ones.
        ``teacher``: the EDM model a consistency model is distilled from; ``target``: the model
        holding the consistency target's weights (default: this one, without gradient)."""
        x = self.normalize_points(showers.points)
        batch, counts, b = showers.batch, showers.num_points, len(showers)
        needs_shape = self.shape_embed is not None or (
            teacher is not None and teacher.shape_embed is not None)
        shape = self.codec.measure(showers.points, batch, b) if needs_shape else None
        net = self.network(cond, batch, counts, None if self.shape_embed is None
                           else self.shape_context(shape))
        extra = {}
        if sigma is not None:
            if self.objective.name != "edm":
                raise ValueError("point_loss(sigma=...) fixes an EDM noise level; this model's "
                                 f"objective is {self.objective.name!r}")
            extra["sigma"] = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(b)
        if teacher is not None:
            t_shape = None if teacher.shape_embed is None else teacher.shape_context(shape)
            extra["teacher"] = lambda xt, s: teacher.denoise(xt, s, cond, batch, counts, t_shape)
        if target is not None:
            extra["target"] = target.network(cond, batch, counts, None if target.shape_embed is None
                                             else target.shape_context(shape))
        return self.objective.loss(net, x, batch, b, generator, **extra)

    def network_calls(self, steps: int | None = None, sampler: str | None = None) -> int:
        """Point-network calls per shower of a sample with ``steps`` steps of ``sampler``
        (defaults: the model's)."""
        return self.objective.network_calls(sampler or self.config["sampler"],
                                            int(steps or self.config["steps"]))

    # ------------------------------------------------------------------ sampling
    def postprocess(self, points: torch.Tensor, ptr: torch.Tensor, shape: ShowerShape,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw sampled points → final physics-frame points: calibration to the sampled shape,
        the declump (if configured), then the configured sub-voxel split. Returns
        ``(points, ptr)``."""
        core, slice_core = self.config["core_radius"], self.config["slice_core_radius"]
        sc = self.config["split"]
        points = calibrate_points(points, ptr, shape, self.codec.z_edges, self.codec.r_edges,
                                  None if core is None else float(core),
                                  self.slice_depth if sc["snap_depth"] else None,
                                  None if slice_core is None else float(slice_core))
        if sc["declump"]:
            points, _ = declump_points(points, ptr, sc["box"])
        box = sc["box"]
        if sc["spread"]:
            if int(self.split_spread_showers) == 0:
                warnings.warn("this model's split spread table was never measured: every point is "
                              "spread over the uniform training voxel (run `pcshower fit-split`)",
                              stacklevel=3)
            box = spread_boxes(points, self.split_spread,
                               grid=sc["box"] if sc["spread_key"] == "voxel" else None)
        return split_points(points, ptr, int(sc["factor"]), box, generator)

    @torch.no_grad()
    def fit_split_spread(self, showers, *, progress: bool = True) -> dict:
        """Measure the per-point split box table on physics-frame showers finer than the
        training grid (a :class:`Showers` batch or an iterable of batches); see
        :func:`pcshower.models.split.measure_voxel_spread`. Returns its ``info`` dict."""
        if not self.config["split"]["spread"]:
            raise ValueError("this model's config has split.spread: false; set it (with a split "
                             "factor and box) to use a measured spread table")
        snap = bool(self.config["split"]["snap_depth"])
        table, info = measure_voxel_spread(showers, self.config["split"]["box"], progress=progress,
                                           slice_edges=self.codec.z_edges if snap else None,
                                           by_voxel=self.config["split"]["spread_key"] == "voxel")
        self.split_spread.copy_(table)
        if snap:
            self.slice_depth.copy_(torch.tensor(info["slice_depth"]))
        self.split_spread_showers.fill_(int(info["showers"]))
        return info

    @torch.no_grad()
    def sample_shape(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> ShowerShape:
        y = self.flow.sample(cond, generator) * self.norm.shape_std + self.norm.shape_mean
        return self.codec.decode(y, max_points=int(self.config["max_points"]))

    @torch.no_grad()
    def sample(self, energy, theta, phi, *, steps: int | None = None, sampler: str | None = None,
               generator: torch.Generator | None = None, calibrate: bool = True,
               cond_phi=None, shape: ShowerShape | None = None, on_call=None) -> Showers:
        """Physics-frame showers for conditions ``energy [B]`` GeV, ``theta``/``phi [B]`` rad.

        ``on_call``: called with no argument after every network (denoiser) call, e.g. to move a
        progress bar.

        ``calibrate=False`` returns the network's raw points (no calibration to the sampled
        shape, no sub-voxel split: see :meth:`postprocess`).

        ``shape``: a :class:`ShowerShape` of ``B`` showers to use instead of the flow's sample
        (e.g. ``model.codec.measure`` of reference showers, to test the point network alone).

        ``cond_phi`` (rad), when given, replaces ``phi`` in the network's conditioning only (for
        models trained at one azimuth); the showers still carry ``phi``."""
        dev = self.norm.shape_mean.device
        energy = torch.as_tensor(energy, dtype=torch.float64, device=dev).reshape(-1)
        theta = torch.as_tensor(theta, dtype=torch.float64, device=dev).reshape(-1)
        phi = torch.as_tensor(phi, dtype=torch.float64, device=dev).reshape(-1)
        if cond_phi is None:
            cond = self.condition(energy, theta, phi)
        else:
            cond = self.condition(energy, theta, torch.as_tensor(
                cond_phi, dtype=torch.float64, device=dev).reshape(-1).expand_as(phi))
        if shape is None:
            shape = self.sample_shape(cond, generator)
        elif len(shape.num_points) != len(cond):
            raise ValueError(f"shape holds {len(shape.num_points)} showers for {len(cond)} "
                             f"conditions")
        counts = shape.num_points.to(dev)
        b = len(counts)
        ptr = torch.zeros(b + 1, dtype=torch.int64, device=dev)
        torch.cumsum(counts, 0, out=ptr[1:])
        batch = torch.repeat_interleave(torch.arange(b, device=dev), counts)
        name = sampler or self.config["sampler"]
        net = self.network(cond, batch, counts, self.shape_context(shape),
                           chunk_points=self.chunk_points)
        if on_call is not None:
            raw = net

            def net(x_in, t):
                out = raw(x_in, t)
                on_call()
                return out

        with torch.inference_mode():  # no autograd bookkeeping in the sampler's loop
            x = self.objective.sample(net, (batch.shape[0], 4), batch, b,
                                      int(steps or self.config["steps"]), name, generator)
        x = x.clone()  # an ordinary tensor again (inference tensors refuse autograd later)
        points = self.denormalize_points(x)
        if calibrate:
            points, ptr = self.postprocess(points, ptr, shape, generator)
        return Showers(points=points, ptr=ptr, energy=energy, theta=theta, phi=phi,
                       frame="physics", validate=False)


def _asinh_ratio(u: torch.Tensor) -> torch.Tensor:
    """asinh(u) / u, equal to 1 at u = 0 (series below 1e-4)."""
    small = u < 1e-4
    safe = torch.where(small, torch.ones_like(u), u)
    return torch.where(small, 1.0 - u * u / 6.0, torch.asinh(safe) / safe)


def _sinh_ratio(u: torch.Tensor) -> torch.Tensor:
    """sinh(u) / u, equal to 1 at u = 0; u is capped at 80 (sinh overflows float32 near 89)."""
    u = u.clamp(max=80.0)
    small = u < 1e-4
    safe = torch.where(small, torch.ones_like(u), u)
    return torch.where(small, 1.0 + u * u / 6.0, torch.sinh(safe) / safe)


def _check_physics(showers: Showers) -> None:
    if showers.frame != "physics":
        raise ValueError(f"pcshower models are trained in the physics frame, but these showers are "
                         f"in the {showers.frame!r} frame: simulate with frame='physics'")
