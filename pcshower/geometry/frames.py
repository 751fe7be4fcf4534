"""Where a shower enters a detector and how it is oriented there: module planes, surfaces, local frames.

Every shower is placed in a right-handed local frame ``(u, v, n)`` at its impact point: ``n`` is
the inward normal of the calorimeter face (the stacking direction), ``u`` and ``v`` span the face.
Barrel faces use ``u`` along the azimuth (phi-hat) and ``v`` along the beam (z); endcap faces use
``u = x`` and ``v = +-y`` so that ``u x v = n``. The incident direction in that frame is given by
``theta_local`` (angle to ``n``) and ``phi_local`` (azimuth about ``n``, from ``u`` towards ``v``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Modules", "CylinderSurface", "ShowerFrames", "direction_vectors", "rotation_to_local"]


def direction_vectors(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` unit vectors of polar angle ``theta`` and azimuth ``phi`` (radians)."""
    st = torch.sin(theta)
    return torch.stack([st * torch.cos(phi), st * torch.sin(phi), torch.cos(theta)], dim=-1)


def rotation_to_local(theta_local: torch.Tensor, phi_local: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 3]`` rotations ``R = R_z(phi) R_y(theta)`` taking the shower axis ``z'`` to the
    incident direction in the local frame (``R @ (0, 0, 1) = (sin t cos p, sin t sin p, cos t)``)."""
    ct, st = torch.cos(theta_local), torch.sin(theta_local)
    cp, sp = torch.cos(phi_local), torch.sin(phi_local)
    zero = torch.zeros_like(ct)
    return torch.stack([
        torch.stack([cp * ct, -sp, cp * st], dim=-1),
        torch.stack([sp * ct, cp, sp * st], dim=-1),
        torch.stack([-st, zero, ct], dim=-1),
    ], dim=-2)


@dataclass
class ShowerFrames:
    """The local frame of each shower: ``origin`` of the module/face frame [B, 3] (global mm),
    axes ``u``, ``v``, ``n`` [B, 3], the module index [B] (-1: the shower hits no module), the
    impact point in that frame ``impact_uv`` [B, 2] and the local direction angles [B]."""

    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    n: torch.Tensor
    module: torch.Tensor
    impact_uv: torch.Tensor
    theta_local: torch.Tensor
    phi_local: torch.Tensor

    def to_global(self, local: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """``[P, 3]`` local (u, v, n) points of the showers ``batch`` to global coordinates."""
        return (self.origin[batch] + local[:, 0:1] * self.u[batch] + local[:, 1:2] * self.v[batch]
                + local[:, 2:3] * self.n[batch])


class Modules:
    """Flat module faces (planar readouts): polygon barrel staves, endcap planes, or one plane.

    Each module ``m`` has a front-face centre ``origin[m]``, axes ``u, v, n`` and an acceptance
    ``|u| <= half[m, 0] + depth * widen[m]``, ``|v| <= half[m, 1]`` minus a central hole
    ``|u| < hole[m, 0] and |v| < hole[m, 1]``. Barrel staves widen with depth
    (``widen = tan(pi / N)``): they are the trapezoidal sectors that tile the polygonal shell, so
    every point of the barrel belongs to exactly one stave.
    """

    def __init__(self, placement: dict):
        origin, us, vs, ns, half, hole, names, widen = [], [], [], [], [], [], [], []
        if "plane" in placement:
            p = placement["plane"]
            hw = p["half_width_mm"] or [math.inf, math.inf]
            origin.append([0.0, 0.0, p["distance_mm"]])
            us.append([1.0, 0.0, 0.0]), vs.append([0.0, 1.0, 0.0]), ns.append([0.0, 0.0, 1.0])
            half.append(hw), hole.append([0.0, 0.0]), names.append("plane"), widen.append(0.0)
        if "polygon_barrel" in placement:
            p = placement["polygon_barrel"]
            k = p["symmetry"]
            radius = p["inner_radius_mm"]
            for i in range(k):
                a = math.radians(p["phi0_deg"]) + 2 * math.pi * i / k
                n = [math.cos(a), math.sin(a), 0.0]
                origin.append([radius * n[0], radius * n[1], 0.0])
                ns.append(n), us.append([-math.sin(a), math.cos(a), 0.0]), vs.append([0.0, 0.0, 1.0])
                half.append([radius * math.tan(math.pi / k), p["half_length_mm"]])
                hole.append([0.0, 0.0]), names.append(f"barrel stave {i}")
                widen.append(math.tan(math.pi / k))
        if "endcaps" in placement:
            p = placement["endcaps"]
            for sign in (1.0, -1.0):
                origin.append([0.0, 0.0, sign * p["z_min_mm"]])
                us.append([1.0, 0.0, 0.0]), vs.append([0.0, sign, 0.0]), ns.append([0.0, 0.0, sign])
                half.append([p["outer_half_width_mm"]] * 2), hole.append([p["hole_half_width_mm"]] * 2)
                names.append("endcap +z" if sign > 0 else "endcap -z")
                widen.append(0.0)
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        self.origin, self.u, self.v, self.n = t(origin), t(us), t(vs), t(ns)
        self.half, self.hole, self.names, self.widen = t(half), t(hole), names, t(widen)

    def __len__(self) -> int:
        return len(self.names)

    def accepts(self, uv: torch.Tensor, module: torch.Tensor, depth=None) -> torch.Tensor:
        """Whether local ``(u, v)`` (at ``depth`` mm, default the front face) lies on module
        ``module`` (broadcasting)."""
        half, hole = self.half.to(uv.device)[module], self.hole.to(uv.device)[module]
        a = uv.abs()
        half_u = half[..., 0] if depth is None else half[..., 0] + depth * self.widen.to(uv.device)[module]
        inside = (a[..., 0] <= half_u) & (a[..., 1] <= half[..., 1])
        in_hole = (a[..., 0] < hole[..., 0]) & (a[..., 1] < hole[..., 1])
        return inside & ~in_hole

    def hit_by_ray(self, direction: torch.Tensor):
        """First module hit by rays from the origin: ``(module [B], impact_uv [B, 2])``; -1 if none."""
        dev = direction.device
        o, u, v, n = (x.to(dev) for x in (self.origin, self.u, self.v, self.n))
        dn = direction @ n.T  # [B, M]
        dist = (o * n).sum(-1)  # [M] distance of each face from the IP along its normal
        t = torch.where(dn > 1e-12, dist / dn.clamp_min(1e-12), torch.full_like(dn, math.inf))
        rel = t.unsqueeze(-1) * direction.unsqueeze(1) - o  # [B, M, 3]
        rel = torch.nan_to_num(rel, nan=0.0, posinf=0.0, neginf=0.0)
        uv = torch.stack([(rel * u).sum(-1), (rel * v).sum(-1)], dim=-1)  # [B, M, 2]
        ok = self.accepts(uv, torch.arange(len(self), device=dev)) & torch.isfinite(t)
        t = torch.where(ok, t, torch.full_like(t, math.inf))
        best = torch.argmin(t, dim=1)
        found = torch.isfinite(t.gather(1, best[:, None]))[:, 0]
        module = torch.where(found, best, torch.full_like(best, -1))
        impact = uv[torch.arange(len(best), device=dev), best]
        return module, torch.where(found[:, None], impact, torch.zeros_like(impact))

    def containing(self, position: torch.Tensor):
        """Module whose front face is nearest to each ``position`` [B, 3] and accepts it."""
        dev = position.device
        o, u, v, n = (x.to(dev) for x in (self.origin, self.u, self.v, self.n))
        rel = position.unsqueeze(1) - o  # [B, M, 3]
        uv = torch.stack([(rel * u).sum(-1), (rel * v).sum(-1)], dim=-1)
        dist = (rel * n).sum(-1).abs()
        ok = self.accepts(uv, torch.arange(len(self), device=dev))
        dist = torch.where(ok, dist, torch.full_like(dist, math.inf))
        best = torch.argmin(dist, dim=1)
        found = torch.isfinite(dist.gather(1, best[:, None]))[:, 0]
        impact = uv[torch.arange(len(best), device=dev), best]
        return torch.where(found, best, torch.full_like(best, -1)), impact

    def frames(self, module: torch.Tensor, impact_uv: torch.Tensor, direction: torch.Tensor) -> ShowerFrames:
        dev = direction.device
        m = module.clamp_min(0)
        o, u, v, n = (x.to(dev)[m] for x in (self.origin, self.u, self.v, self.n))
        return _frames(o, u, v, n, module, impact_uv, direction)


class CylinderSurface:
    """A cylindrical barrel face ``r = radius``, ``|z| <= half_length`` around the beam axis;
    the local frame at an impact point has ``n = r-hat``, ``u = phi-hat``, ``v = z-hat``."""

    def __init__(self, radius_mm: float, half_length_mm: float):
        self.radius, self.half_length = float(radius_mm), float(half_length_mm)

    def hit_by_ray(self, direction: torch.Tensor) -> torch.Tensor:
        """Impact points [B, 3] of rays from the origin (NaN where the ray misses the barrel)."""
        rho = torch.linalg.vector_norm(direction[:, :2], dim=1)
        t = self.radius / rho.clamp_min(1e-12)
        point = t[:, None] * direction
        miss = (rho < 1e-12) | (point[:, 2].abs() > self.half_length)
        return torch.where(miss[:, None], torch.full_like(point, math.nan), point)

    def frames(self, point: torch.Tensor, direction: torch.Tensor) -> ShowerFrames:
        phi = torch.atan2(point[:, 1], point[:, 0])
        ok = torch.isfinite(point).all(dim=1)
        phi = torch.where(ok, phi, torch.zeros_like(phi))
        zero, one = torch.zeros_like(phi), torch.ones_like(phi)
        n = torch.stack([torch.cos(phi), torch.sin(phi), zero], -1)
        u = torch.stack([-torch.sin(phi), torch.cos(phi), zero], -1)
        v = torch.stack([zero, zero, one], -1)
        origin = torch.where(ok[:, None], point, torch.zeros_like(point))
        module = torch.where(ok, torch.zeros_like(phi, dtype=torch.int64), torch.full_like(phi, -1, dtype=torch.int64))
        return _frames(origin, u, v, n, module, torch.zeros_like(point[:, :2]), direction)


def _frames(o, u, v, n, module, impact_uv, direction) -> ShowerFrames:
    du, dv, dn = (direction * u).sum(-1), (direction * v).sum(-1), (direction * n).sum(-1)
    theta_local = torch.acos(dn.clamp(-1.0, 1.0))
    # the azimuth of a direction along the normal is undefined: 0, not the angle of the
    # round-off in its transverse components (cos(pi/2) = 6e-17 made it 90 deg on a barrel)
    transverse = torch.hypot(du, dv)
    phi_local = torch.where(transverse < 1e-12, torch.zeros_like(du), torch.atan2(dv, du))
    return ShowerFrames(o, u, v, n, module, impact_uv, theta_local, phi_local)
