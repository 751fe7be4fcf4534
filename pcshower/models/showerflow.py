r"""ShowerFlow: a conditional normalising flow for the global shape of a shower.

As in CaloClouds II (Buhmann et al., arXiv:2309.05704, section 3.2), one flow samples, per
shower, the numbers that fix its global shape before any point is drawn: the number of points
:math:`N`, the visible energy (fraction of the incident energy), the energy-weighted centre of
gravity :math:`(x, y, z)`, for each depth slice the fraction of the energy and of the points
it holds, and (optionally) the fraction of the energy in rings about the shower axis. Transforms that make the flow's job easy and keep the physics valid:

* :math:`N` is dequantised, :math:`y_N = \ln(N + u)`, :math:`u \sim U[0, 1)`; sampling inverts
  with :math:`\lfloor e^{y_N} \rfloor \ge 1` (Uria, Murray, Larochelle, arXiv:1306.0186).
* energies are modelled as logarithms (always positive after sampling), slice fractions as
  :math:`\ln(f + \epsilon)` and renormalised to sum to one after sampling; the per-slice point
  counts are rounded by largest remainder so that they add up to :math:`N` exactly.

The flow is zuko's neural spline flow (Durkan et al., arXiv:1906.04032): monotone rational-
quadratic splines on ``[-5, 5]`` (identity outside) in an autoregressive stack, on features
standardised to unit variance, so the spline domain covers the data.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
import weakref
from dataclasses import dataclass, fields

import torch
import zuko
from torch import nn

from pcshower.nn.pooling import segment_sum

__all__ = ["ShowerShape", "ShapeCodec", "ShowerFlow", "slice_edges", "slice_index", "ring_index"]


def slice_edges(num: int, z_max_x0: float, centred: bool = False) -> torch.Tensor:
    """``[num + 1]`` depth-slice edges (X0) of width ``w = z_max_x0 / num``.

    ``centred=False``: ``0, w, 2w, ..., z_max_x0``. ``centred=True``: slice ``k`` is centred on
    the depth ``k w`` (edges ``0, w/2, 3w/2, ..., (num - 1/2) w``), the depths at which
    :func:`~pcshower.simulate.reduce_points` with ``dz = w`` puts its merged points (its voxels
    are centred on multiples of ``dz``). Edges that fall on that lattice instead cut each layer of
    merged points in two at random (a centroid lies just above or just below the edge), so the
    measured slice energies mix neighbouring layers and the calibration piles points onto the
    edges.
    """
    if int(num) < 1 or not float(z_max_x0) > 0:
        raise ValueError(f"slices need num >= 1 and z_max_x0 > 0, got {num} and {z_max_x0}")
    w = float(z_max_x0) / int(num)
    edges = torch.arange(int(num) + 1, dtype=torch.float64) * w
    if centred:
        edges[1:] -= 0.5 * w
    return edges.to(torch.float32)


@dataclass
class ShowerShape:
    """Global shape of ``B`` showers (physics frame).

    Attributes:
        num_points: ``[B]`` int64 number of points.
        visible_energy: ``[B]`` summed point energy, fraction of the incident energy.
        cog: ``[B, 3]`` energy-weighted centre of gravity (R_M, R_M, X0).
        slice_energy: ``[B, S]`` fraction of the visible energy in each depth slice.
        slice_points: ``[B, S]`` int64 number of points in each depth slice.
        ring_energy: ``[B, R]`` fraction of the visible energy in each ring about the shower
            axis (``None`` for a codec without rings).
    """

    num_points: torch.Tensor
    visible_energy: torch.Tensor
    cog: torch.Tensor
    slice_energy: torch.Tensor
    slice_points: torch.Tensor
    ring_energy: torch.Tensor | None = None

    @classmethod
    def concat(cls, parts: list[ShowerShape]) -> ShowerShape:
        """The shapes of several batches as one, in order."""
        if len(parts) == 1:
            return parts[0]
        return cls(*(None if getattr(parts[0], f.name) is None
                     else torch.cat([getattr(s, f.name) for s in parts]) for f in fields(cls)))


def slice_index(z: torch.Tensor, z_edges: torch.Tensor) -> torch.Tensor:
    """Depth slice of each depth ``z`` for slice edges ``z_edges [S+1]`` (X0); depths outside
    count in the first / last slice."""
    return torch.bucketize(z.contiguous(), z_edges[1:-1].to(z.device, z.dtype), right=True)


def ring_index(points: torch.Tensor, r_edges: torch.Tensor) -> torch.Tensor:
    """Ring about the shower axis (x = y = 0) of each point for inner ring edges ``r_edges``
    (R_M; the last ring open)."""
    r = torch.hypot(points[:, 0], points[:, 1]).contiguous()
    return torch.bucketize(r, r_edges.to(r.device, r.dtype), right=True)


class ShapeCodec:
    """Measures a :class:`ShowerShape` on physics-frame points and maps it to and from the flow's
    real-valued feature vector ``[B, 5 + 2S + R]`` (log N, log E_vis, CoG x/y/z, slice energy
    fractions, slice point fractions, ring energy fractions).

    Args:
        z_edges: ``[S+1]`` depth-slice edges in X0; points outside go to the first/last slice.
        eps: floor added to fractions before the logarithm.
        r_edges: inner edges (R_M, increasing, > 0) of rings about the shower axis, whose energy
            fractions the flow also samples (``R = len(r_edges) + 1`` rings, the last one
            open); ``None``: no rings.
        dequantize_zeros: the fractions are dequantised in training (:meth:`dequantize_zeros`),
            and :meth:`decode` reads every fraction below ``eps`` as exactly zero.
    """

    def __init__(self, z_edges: torch.Tensor, eps: float = 1e-3, r_edges=None,
                 dequantize_zeros: bool = False):
        self.z_edges = torch.as_tensor(z_edges, dtype=torch.float32)
        self.eps = float(eps)
        self.dequantize = bool(dequantize_zeros)
        self.r_edges = None
        if r_edges is not None:
            r = torch.as_tensor([float(v) for v in r_edges], dtype=torch.float32)
            if r.numel() == 0 or not bool(torch.isfinite(r).all()) or bool((r <= 0).any()) \
                    or bool((r[1:] <= r[:-1]).any()):
                raise ValueError(f"ring edges must be increasing positive numbers (R_M), got "
                                 f"{list(r_edges)!r}")
            self.r_edges = r

    @property
    def num_slices(self) -> int:
        return self.z_edges.numel() - 1

    @property
    def num_rings(self) -> int:
        return 0 if self.r_edges is None else self.r_edges.numel() + 1

    @property
    def num_features(self) -> int:
        return 5 + 2 * self.num_slices + self.num_rings

    def slice_of(self, z: torch.Tensor) -> torch.Tensor:
        return slice_index(z, self.z_edges)

    def ring_of(self, points: torch.Tensor) -> torch.Tensor:
        """Ring index of each point (distance from the shower axis x = y = 0)."""
        return ring_index(points, self.r_edges)

    def measure(self, points: torch.Tensor, batch: torch.Tensor, num_showers: int) -> ShowerShape:
        s = self.num_slices
        e = points[:, 3].double()
        counts = torch.bincount(batch, minlength=num_showers)
        evis = segment_sum(e, batch, num_showers)
        w = segment_sum(points[:, :3].double() * e[:, None], batch, num_showers)
        cog = w / evis.clamp(min=1e-30)[:, None]
        group = batch * s + self.slice_of(points[:, 2])
        slice_e = segment_sum(e, group, num_showers * s).view(num_showers, s)
        slice_n = torch.bincount(group, minlength=num_showers * s).view(num_showers, s)
        rings = None
        if self.r_edges is not None:
            k = self.num_rings
            ring_e = segment_sum(e, batch * k + self.ring_of(points), num_showers * k)
            rings = (ring_e.view(num_showers, k) / evis.clamp(min=1e-30)[:, None]).float()
        return ShowerShape(counts, evis.float(), cog.float(),
                           (slice_e / evis.clamp(min=1e-30)[:, None]).float(), slice_n, rings)

    def measure_showers(self, showers, chunk: int = 1000) -> ShowerShape:
        """:meth:`measure` on a ``Showers`` batch, ``chunk`` showers at a time: the same numbers
        (each shower's sums run over its own points in the same order), with temporaries the
        size of a chunk instead of the whole set (measuring 50 000 showers of 4000 points at
        once needs ~10 GB of double-precision temporaries)."""
        return ShowerShape.concat([self.measure(part.points, part.batch, len(part))
                                   for part in showers.split(chunk)])

    def encode(self, shape: ShowerShape, u: torch.Tensor | None = None) -> torch.Tensor:
        """Feature vector; ``u [B]`` is the dequantisation noise (0.5 when None)."""
        n = shape.num_points.float()
        if u is None:
            u = torch.full_like(n, 0.5)
        frac_n = shape.slice_points.float() / n.clamp(min=1)[:, None]
        cols = [(n + u).log()[:, None], shape.visible_energy.clamp(min=1e-12).log()[:, None],
                shape.cog, (shape.slice_energy + self.eps).log(), (frac_n + self.eps).log()]
        if self.r_edges is not None:
            cols.append((shape.ring_energy + self.eps).log())
        return torch.cat(cols, dim=1)

    def _fractions(self, y: torch.Tensor) -> torch.Tensor:
        f = (y.exp() - self.eps).clamp(min=0)
        return torch.where(f < self.eps, 0.0, f) if self.dequantize else f

    def zero_fractions(self, shape: ShowerShape) -> torch.Tensor:
        """``[B, F]`` mask of the features that hold an exact zero fraction (a slice or ring
        without energy or points; False for the first five features)."""
        parts = [torch.zeros(len(shape.num_points), 5, dtype=torch.bool),
                 shape.slice_energy == 0, shape.slice_points == 0]
        if self.r_edges is not None:
            parts.append(shape.ring_energy == 0)
        return torch.cat(parts, dim=1)

    def dequantize_zeros(self, y: torch.Tensor, zero: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Feature vectors ``y`` with each exact-zero fraction (``zero``, from
        :meth:`zero_fractions`) spread uniformly over the fractions [0, eps): ln(eps (1 + u)),
        ``u`` uniform in [0, 1) of ``y``'s shape. Many showers have no energy in their first or
        last slices; their zeros are a point mass at ln(eps) that a flow can only smear into its
        neighbours (measured on the version-8 default flow: 0.37-0.90 of the reference's mean
        energy in slices 1-8 of 0.5 X0), while a box of width ln 2 is a density it can learn.
        Decoding maps the box back to zero."""
        return torch.where(zero, math.log(self.eps) + torch.log1p(u), y)

    def decode(self, y: torch.Tensor, max_points: int | None = None) -> ShowerShape:
        s = self.num_slices
        n = y[:, 0].exp().floor().clamp(min=1)
        if max_points is not None:
            n = n.clamp(max=float(max_points))
        n = n.long()
        evis = y[:, 1].exp()
        cog = y[:, 2:5]
        frac_e = _renormalise(self._fractions(y[:, 5:5 + s]))
        frac_n = _renormalise(self._fractions(y[:, 5 + s:5 + 2 * s]))
        rings = None
        if self.r_edges is not None:
            rings = _renormalise(self._fractions(y[:, 5 + 2 * s:]))
        return ShowerShape(n, evis, cog, frac_e, largest_remainder(frac_n, n), rings)


def _renormalise(f: torch.Tensor) -> torch.Tensor:
    total = f.sum(1, keepdim=True)
    # a shower whose every fraction was sampled at the floor falls back to a flat profile
    flat = torch.full_like(f, 1.0 / f.shape[1])
    return torch.where(total > 0, f / total.clamp(min=1e-30), flat)


def largest_remainder(fractions: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Integer ``[B, S]`` counts proportional to ``fractions`` (rows sum to 1) that add up to
    ``total [B]`` exactly (Hamilton's largest-remainder rounding), vectorised over showers."""
    exact = fractions.double() * total.double()[:, None]
    base = exact.floor()
    deficit = (total.double() - base.sum(1)).long()
    order = torch.argsort(exact - base, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return base.long() + (rank < deficit[:, None]).long()


class ShowerFlow(nn.Module):
    """Conditional neural spline flow over standardised shape features.

    Args:
        features: feature dimension (``ShapeCodec.num_features``).
        context: conditioning dimension.
        transforms: number of autoregressive spline transforms.
        hidden: hidden widths of each transform's MADE network.
        bins: spline bins.
        passes: ``None`` for a fully autoregressive flow (density in one pass, but sampling
            needs one network pass per feature: seconds for 65 features), or ``2`` for coupling
            transforms (half the features condition the other half; sampling in two passes).
            Successive transforms reverse the feature order, so every feature gets transformed.
    """

    def __init__(self, features: int, context: int, *, transforms: int = 4,
                 hidden: tuple[int, ...] = (128, 128), bins: int = 8, passes: int | None = None):
        super().__init__()
        self.features = features
        self.flow = zuko.flows.NSF(features, context, bins=bins, transforms=transforms,
                                   hidden_features=tuple(hidden), passes=passes)

    def log_prob(self, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.flow(context).log_prob(y)

    def sample(self, context: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sample per context row; the base noise comes from ``generator`` (reproducible).

        Without autograd the fixed costs of a call are cut (the same numbers). A call runs
        zuko's flow with each masked layer's ``mask * weight`` formed once per call instead of
        at each of its network passes, and zuko's shape broadcasting in Python (these patch
        zuko's objects for the duration of the call, so such calls are serialised by a
        process-wide lock). From the :data:`TRACE_AFTER`-th call with one batch size, dtype and
        device on, the inverse transform runs as a traced TorchScript graph instead (traced
        once, reading this flow's current parameters at each call): median 13.4 → 10.1 ms a
        call at batch 1 on one CPU thread (benchmarks/flow_call.py, docs/benchmarks.md), bit for
        bit the same samples. The first calls stay untraced because tracing
        and TorchScript's first optimising runs cost ~0.3 s, more than a short job's few calls.
        """
        if torch.is_grad_enabled() or torch.jit.is_tracing():  # traced: zuko's own code
            return self._sample(context, generator)
        z = self._noise(context, generator)
        with _FAST_LOCK, torch.inference_mode():
            graph = self._graph(z, context)
            if graph is not None:
                y = graph(z, context)
            else:
                with _masked_weights_fixed(self.flow), _plain_broadcast():
                    y = self._inverse(z, context)
        return y.clone()  # an ordinary tensor (inference tensors refuse autograd later)

    def _inverse(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The flow's sample for standard normal noise ``z`` (the base distribution's affine
        map, then the inverse transform)."""
        dist = self.flow(context)
        base = getattr(dist.base, "base_dist", dist.base)  # zuko's DiagNormal is Independent(Normal)
        return dist.transform.inv(base.loc + base.scale * z)

    def _noise(self, context: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal base noise, one row per context row."""
        return torch.randn(context.shape[0], self.features, generator=generator,
                           device=context.device, dtype=context.dtype)

    def _sample(self, context, generator):
        return self._inverse(self._noise(context, generator), context)

    def _graph(self, z: torch.Tensor, context: torch.Tensor):
        """The traced inverse for this call's shapes once they were seen :data:`TRACE_AFTER`
        times, as a function of ``(z, context)``, else ``None`` (also where tracing failed:
        the Python path serves)."""
        cache = _TRACED.setdefault(self, {})
        weight = next(self.parameters())
        key = (z.shape[0], z.dtype, context.shape[1], context.dtype, str(z.device), weight.dtype)
        entry = cache.get(key, 0)
        if isinstance(entry, int):
            if entry + 1 < TRACE_AFTER:
                cache[key] = entry + 1
                return None
            try:
                entry = _traced_inverse(self, z, context)
            except Exception:  # noqa: BLE001 - an optimisation only: the Python path is exact
                entry = None
            cache[key] = entry
        return entry


def _traced_inverse(flow: ShowerFlow, z: torch.Tensor, context: torch.Tensor):
    """``flow._inverse`` traced with the flow's parameters and buffers as graph INPUTS, passed
    detached at each call: the graph always reads the current tensors (updated in place or
    replaced through ``.data``), and it sees no tensor that requires grad."""
    module = _Inverse(flow)
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]

    def tensors():
        return [t.detach() for t in (*module.parameters(), *module.buffers())]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes, and torch.jit's deprecation
        graph = torch.jit.trace(_Functional(module, names), (z, context, *tensors()),
                                check_trace=False)
    return lambda zz, cc: graph(zz, cc, *tensors())


class _Inverse(nn.Module):
    """``ShowerFlow._inverse`` as a module."""

    def __init__(self, flow: ShowerFlow):
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.flow._inverse(z, context)


class _Functional(nn.Module):
    """``module(z, context)`` with its parameters and buffers given as arguments."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, z: torch.Tensor, context: torch.Tensor, *tensors: torch.Tensor):
        # torch.func.functional_call refuses to run under the tracer; the helper behind it does
        # not (private: where it is missing, tracing fails and the Python path serves)
        from torch.nn.utils.stateless import _reparametrize_module

        with _reparametrize_module(self.module, dict(zip(self.names, tensors))):
            return self.module(z, context)


#: Calls with one batch size after which ShowerFlow.sample runs a traced graph.
TRACE_AFTER = 5
#: Traced inverse transforms (or call counts before tracing) per flow and call shape.
_TRACED: "weakref.WeakKeyDictionary[ShowerFlow, dict]" = weakref.WeakKeyDictionary()


#: Serialises ShowerFlow's fast sampling: it patches zuko's layers and functions for the call.
_FAST_LOCK = threading.RLock()


def _shapes_broadcast(shapes) -> torch.Size:
    """NumPy's broadcasting rule on shapes, in Python (``torch.broadcast_shapes`` imports sympy
    on its first call: 0.5 s of a short job's start)."""
    ndim = max(len(s) for s in shapes)
    out = []
    for k in range(ndim):
        sizes = {s[len(s) - ndim + k] for s in shapes if len(s) - ndim + k >= 0} - {1}
        if len(sizes) > 1:
            raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} cannot be broadcast")
        out.append(sizes.pop() if sizes else 1)
    return torch.Size(out)


@contextlib.contextmanager
def _plain_broadcast():
    """zuko's ``broadcast`` (features with context, spline knots with bins) with the shape rule
    computed in Python instead of by ``torch.broadcast_shapes`` (same result)."""
    import zuko.flows.autoregressive
    import zuko.transforms

    modules = (zuko.flows.autoregressive, zuko.transforms)
    originals = [m.broadcast for m in modules]

    def broadcast(*tensors, ignore=0):
        ignores = [ignore] * len(tensors) if isinstance(ignore, int) else list(ignore)
        dims = [t.dim() - i for t, i in zip(tensors, ignores)]
        common = _shapes_broadcast([t.shape[:d] for t, d in zip(tensors, dims)])
        return [t if t.shape[:d] == common else t.broadcast_to(common + t.shape[d:])
                for t, d in zip(tensors, dims)]

    for m in modules:
        m.broadcast = broadcast
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.broadcast = original


@contextlib.contextmanager
def _masked_weights_fixed(flow: nn.Module):
    """zuko's ``MaskedLinear`` forms ``mask * weight`` (a bool-to-float copy and a product of the
    whole weight) at every call, twice a transform when sampling; here each layer forms it once
    for the call."""
    patched = []
    for layer in flow.modules():
        if isinstance(layer, zuko.nn.MaskedLinear) and "forward" not in vars(layer):
            layer.forward = functools.partial(torch.nn.functional.linear,
                                              weight=layer.mask * layer.weight, bias=layer.bias)
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward
