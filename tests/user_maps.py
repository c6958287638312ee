"""A user's elementwise feature map with a Triton form (softplus), shared by the tests of the
fused maps: with ``dphi_from_y`` (``Softplus``) and without it (``SoftplusXSlope``).
Importing this module needs Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import featattn


@triton.jit
def softplus_phi(x):
    return tl.where(x > 15.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 15.0))))


@triton.jit
def softplus_dphi(x, y):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def softplus_dphi_y(y):
    # sigmoid(x) = 1 - exp(-softplus(x))
    return 1.0 - tl.exp(-y)


class Softplus(featattn.FeatureMap):
    """Softplus, whose Triton form's slope also comes from the feature alone (dphi_from_y)."""

    def output_dim(self, d):
        return d

    def triton_elementwise(self):
        return featattn.ElementwiseTritonForm(softplus_phi, softplus_dphi, softplus_dphi_y)

    def forward(self, x):
        return torch.nn.functional.softplus(x.float()).to(x.dtype)


class SoftplusXSlope(Softplus):
    """The same map without dphi_from_y: its pass keeps a backward pass of its own."""

    def triton_elementwise(self):
        return featattn.ElementwiseTritonForm(softplus_phi, softplus_dphi)
