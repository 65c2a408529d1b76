"""Batched, differentiable ray transform ``A: (B,1,H,W) -> (B,1,V,D)`` with two interchangeable backends.

* ``odl``: ODL's ``RayTransform`` applied image by image: the reference.
* ``sparse``: the same ASTRA projector's system matrix as an int32 CSR tensor, applied to the whole
  batch with one sparse matmul (on CPU or GPU); A^T is stored as its own CSR so the adjoint is
  equally fast.

Both use unit weighting, so ``adjoint`` is the exact transpose and autograd's backward of the
forward is the adjoint (and vice versa).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from ldir_pl.errors import ConfigError
from ldir_pl.physics.geometry import CTGeometry
from ldir_pl.physics.system_matrix import load_system_matrix

BACKENDS = ("sparse", "odl")


def _to_csr(mat: sp.csr_matrix) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(mat.indptr.astype(np.int32)),
            torch.from_numpy(mat.indices.astype(np.int32)),
            torch.from_numpy(mat.data.astype(np.float32)),
            size=mat.shape,
        )


class _Apply(torch.autograd.Function):
    """y = op(x) with backward given by the transpose: keeps gradients exact and cheap."""

    @staticmethod
    def forward(ctx, x: Tensor, op: RayTransform, transpose: bool) -> Tensor:  # noqa: D401
        ctx.op, ctx.transpose = op, transpose
        return op._project(x, transpose)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.op._project(grad.contiguous(), not ctx.transpose), None, None


class RayTransform(nn.Module):
    """Differentiable ray transform with an explicit geometry, for batches of 1-channel images."""

    def __init__(
        self,
        geometry: CTGeometry,
        backend: str = "sparse",
        impl: str = "astra_cpu",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"physics.backend={backend!r}: expected one of {BACKENDS}")
        self.geometry, self.backend, self.impl = geometry, backend, impl
        self._odl_op = geometry.odl_ray_transform(impl) if backend == "odl" else None
        self._mats: dict[tuple[bool, torch.device], Tensor] = {}
        self._csr: sp.csr_matrix | None = None
        self._cache_dir = cache_dir
        if backend == "sparse":
            self._csr = load_system_matrix(geometry, cache_dir)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.geometry.image_shape

    @property
    def sino_shape(self) -> tuple[int, int]:
        return self.geometry.sino_shape

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, self.image_shape, "image")
        return _Apply.apply(x, self, False)

    def adjoint(self, y: Tensor) -> Tensor:
        self._check(y, self.sino_shape, "sinogram")
        return _Apply.apply(y, self, True)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, geometry={self.geometry.as_dict()}"

    # ------------------------------------------------------------------ internals
    def _check(self, t: Tensor, shape: tuple[int, int], what: str) -> None:
        if t.ndim != 4 or t.shape[1] != 1 or tuple(t.shape[-2:]) != tuple(shape):
            raise ConfigError(
                f"{what} of shape {tuple(t.shape)} does not match the geometry: expected (B, 1, {shape[0]}, "
                f"{shape[1]}) for {self.geometry.beam} beam, {self.geometry.num_views} views, "
                f"{self.geometry.image_size}x{self.geometry.image_size} image"
            )

    def _matrix(self, transpose: bool, device: torch.device) -> Tensor:
        key = (transpose, device)
        if key not in self._mats:
            mat = self._csr.T.tocsr() if transpose else self._csr
            self._mats[key] = _to_csr(mat).to(device)
        return self._mats[key]

    def _project(self, x: Tensor, transpose: bool) -> Tensor:
        out_shape = self.image_shape if transpose else self.sino_shape
        b = x.shape[0]
        if self.backend == "sparse":
            flat = x.reshape(b, -1).to(torch.float32).T.contiguous()
            with torch.autocast(x.device.type, enabled=False):  # fp32 always, also in a bf16 sampler's backward
                out = (self._matrix(transpose, x.device) @ flat).T
            return out.reshape(b, 1, *out_shape).to(x.dtype)
        op = self._odl_op.adjoint if transpose else self._odl_op
        arr = x.detach().to("cpu", torch.float32).numpy()
        res = np.stack([op(op.domain.element(a[0])).data for a in arr])
        return torch.from_numpy(np.ascontiguousarray(res, dtype=np.float32)).reshape(b, 1, *out_shape).to(
            device=x.device, dtype=x.dtype
        )
