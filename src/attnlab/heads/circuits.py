"""The in-context regression circuit of a trained ``ICLRegressor`` ("In-Context Linear
Regression Demystified: Training Dynamics and Mechanistic Interpretability of Multi-Head
Softmax Attention", He et al. 2025).

A one-layer softmax ``ICLRegressor`` predicts, for tokens z_i = [x_i; y_i] and the query
z_q = [x_q; 0],

    y_hat = sum_h sum_i p_hi OV_h[y, :] z_i,   p_hi = softmax_i(z_q^T KQ_h z_i),

with KQ_h = W_Q^h^T W_K^h / sqrt(D) and OV_h = W_O^h W_V^h the head's (d+1) x (d+1) blocks.
The paper finds that training makes each KQ_h = omega_h [I_d 0; 0 0] (diagonal and
homogeneous on the covariates) and each OV_h = mu_h e_y e_y^T (non-zero only at the label),
with heads in pairs of opposite sign so that sum_h mu_h ~ 0. Then, to first order in omega,

    y_hat ~ (sum_h mu_h) y_bar + (sum_h mu_h omega_h) (1/L) sum_i (y_i - y_bar) x_i^T x_q,

the first term vanishes and the layer is one step of debiased gradient descent with step
eta = sum_h mu_h omega_h. ``regression_circuit`` extracts the blocks and the fitted
omega_h, mu_h, measures how far they are from that form, and ``circuit_predictions``
compares the model with the formulas built from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

__all__ = ["CircuitPredictions", "RegressionCircuit", "circuit_predictions",
           "head_contributions", "regression_circuit"]


@dataclass
class RegressionCircuit:
    """Per head h: ``kq`` (H, d+1, d+1), ``ov`` (H, d+1, d+1); ``omega`` (H,) = mean of
    KQ_h's covariate diagonal; ``mu`` (H,) = OV_h[y, y].

    How close to the paper's form (each a relative Frobenius residual in [0, 1], 0 = exact):
    ``kq_off_identity`` = ||KQ_xx - omega I|| / ||KQ_xx|| on the covariate block;
    ``kq_outside`` = the share (in squared norm) of the query's usable rows KQ[x, :] that
    lies outside the covariate block (the x -> y column); ``ov_off_label`` = the share of
    OV's label row outside the label entry (what reaches the prediction);
    ``ov_outside`` = the share of all of OV outside the label entry (the paper's claim on the
    whole block; rows other than y never reach a one-layer prediction).
    ``mu_balance`` = |sum_h mu_h| / sum_h |mu_h| (0: the heads cancel the mean of y)."""

    kq: Tensor
    ov: Tensor
    omega: Tensor
    mu: Tensor
    kq_off_identity: Tensor
    kq_outside: Tensor
    ov_off_label: Tensor
    ov_outside: Tensor

    @property
    def mu_balance(self) -> float:
        return float(self.mu.sum().abs() / self.mu.abs().sum().clamp_min(1e-30))

    @property
    def step(self) -> float:
        """eta = sum_h mu_h omega_h, the debiased-GD step the heads implement together."""
        return float((self.mu * self.omega).sum())


def _layer(model: torch.nn.Module) -> Any:  # the plain softmax Attention (its parts duck-typed)
    from attnlab.mechanisms.base import Attention
    from attnlab.models.icl_regressor import ICLRegressor
    from attnlab.modules.projections import QKVProjection

    if not isinstance(model, ICLRegressor):
        raise TypeError(f"the regression circuit reads an ICLRegressor, got "
                        f"{type(model).__name__}")
    if len(model.layers) != 1 or model.targets != 1:
        raise ValueError("the regression circuit is that of one attention layer and a scalar "
                         f"target; this model has {len(model.layers)} layers and "
                         f"{model.targets} targets")
    layer = model.layers[0]
    plain = (isinstance(layer, Attention) and layer.name == "softmax"
             and type(layer.qkv) is QKVProjection and layer.kv_heads == layer.heads
             and not layer.shape.bias and type(layer.qk_norm.q).__name__ == "Identity"
             and type(layer.rotary).__name__ == "NoRotation"
             and type(layer.gate).__name__ == "NoGate")
    if not plain:
        raise ValueError("the regression circuit needs plain multi-head softmax attention "
                         "(no bias, qk-norm, RoPE, gate or GQA); the model's layer is "
                         f"{layer.name}")
    return layer


def regression_circuit(model: torch.nn.Module) -> RegressionCircuit:
    """The KQ and OV blocks of a one-layer softmax ``ICLRegressor`` and their fit to the
    paper's form (see :class:`RegressionCircuit`)."""
    layer = _layer(model)
    h, dh, dq = layer.heads, layer.head_dim, layer.shape.qk_dim
    d = cast(int, model.d)  # an ICLRegressor (_layer checked)
    with torch.no_grad():
        wq = layer.qkv.q.weight.reshape(h, dq, -1)
        wk = layer.qkv.k.weight.reshape(h, dq, -1)
        wv = layer.qkv.v.weight.reshape(h, dh, -1)
        wo = layer.o_proj.weight.reshape(-1, h, dh).transpose(0, 1)  # (H, C, Dh)
        kq = wq.transpose(1, 2) @ wk / math.sqrt(dq)
        ov = wo @ wv
        xx = kq[:, :d, :d]
        omega = xx.diagonal(dim1=1, dim2=2).mean(-1)
        eye = torch.eye(d, dtype=kq.dtype)
        kq_off = _ratio(xx - omega[:, None, None] * eye, xx)
        usable = kq[:, :d, :]
        kq_outside = _ratio(usable[:, :, d:], usable) ** 2
        mu = ov[:, d, d]
        label_row = ov[:, d, :]
        ov_off_label = _ratio(label_row[:, :d], label_row) ** 2
        off = ov.clone()
        off[:, d, d] = 0
        ov_outside = _ratio(off, ov) ** 2
    return RegressionCircuit(kq, ov, omega, mu, kq_off, kq_outside, ov_off_label, ov_outside)


def _ratio(part: Tensor, whole: Tensor) -> Tensor:
    dims = tuple(range(1, part.dim()))
    return part.pow(2).sum(dims).sqrt() / whole.pow(2).sum(dims).sqrt().clamp_min(1e-30)


def head_contributions(model: torch.nn.Module, x: Tensor, y: Tensor, xq: Tensor) -> Tensor:
    """(B, H): each head's term of y_hat (they sum to the model's prediction)."""
    layer = _layer(model)
    from attnlab.heads.capture import capture

    with torch.no_grad(), capture(model, ["L0.heads"]) as cap:
        model(x, y, xq)
    heads = cap["L0.heads"][:, -1]  # (B, H, Dh) at the query
    h, dh = layer.heads, layer.head_dim
    w_label = layer.o_proj.weight[model.d].reshape(h, dh)  # the label row of W_O, per head
    return (heads * w_label).sum(-1).detach()


@dataclass
class CircuitPredictions:
    """Predictions (B,) on the same episodes: ``model``; ``circuit`` = sum_h mu_h sum_i
    softmax_i(omega_h x_q.x_i) y_i (the idealised heads); ``debiased_gd`` = eta (1/L)
    sum_i (y_i - y_bar) x_i.x_q + (sum_h mu_h) y_bar (its first-order expansion);
    ``averaging`` = eta (1/L) sum_i y_i x_i.x_q (plain GD, the same step, mean kept: the
    reading the paper rules out)."""

    model: Tensor
    circuit: Tensor
    debiased_gd: Tensor
    averaging: Tensor
    target: Tensor


def circuit_predictions(model: torch.nn.Module, circuit: RegressionCircuit, x: Tensor,
                        y: Tensor, xq: Tensor, yq: Tensor) -> CircuitPredictions:
    """The model's predictions next to those of the formulas built from ``circuit``."""
    with torch.no_grad():
        pred = model(x, y, xq)
        s = (x @ xq[..., None]).squeeze(-1)  # (B, L) x_i.x_q
        p = torch.softmax(circuit.omega[None, :, None] * s[:, None, :], dim=-1)  # (B, H, L)
        ideal = ((p * y[:, None, :]).sum(-1) * circuit.mu).sum(-1)
        y_bar = y.mean(-1)
        centred = ((y - y_bar[:, None]) * s).mean(-1)
        gd = circuit.step * centred + circuit.mu.sum() * y_bar
        averaging = circuit.step * (y * s).mean(-1)
    return CircuitPredictions(pred, ideal, gd, averaging, yq)
