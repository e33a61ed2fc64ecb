"""The in-context regression circuit on a planted ICLRegressor whose heads have the paper's
form exactly: KQ_h = omega_h [I 0; 0 0], OV_h = mu_h e_y e_y^T."""

import math

import pytest
import torch

from attnlab.heads.circuits import circuit_predictions, head_contributions, regression_circuit
from attnlab.models.icl_regressor import ICLRegressor

D = 4
OMEGA = (0.2, -0.3, 0.05)
MU = (1.5, -1.0, -0.5)


def planted(omega=OMEGA, mu=MU, extra=0.0) -> ICLRegressor:
    """KQ_h = omega_h [I 0; 0 0] (+ ``extra`` on the x -> y column), OV_h = mu_h at (y, y)."""
    heads = len(omega)
    model = ICLRegressor(D, heads=heads)
    layer = model.layers[0]
    dh = D + 1
    wq = torch.zeros(heads, dh, dh)
    wk = torch.zeros(heads, dh, dh)
    wv = torch.zeros(heads, dh, dh)
    wo = torch.zeros(dh, heads, dh)
    for h in range(heads):
        wq[h, :D, :D] = torch.eye(D) * omega[h] * math.sqrt(dh)
        wk[h, :D, :D] = torch.eye(D)
        wk[h, 0, D] = extra  # key coordinate 0 also reads y: KQ[0, y] = omega * extra
        wv[h, D, D] = 1.0
        wo[D, h, D] = mu[h]
    with torch.no_grad():
        layer.qkv.q.weight.copy_(wq.reshape(heads * dh, dh))
        layer.qkv.k.weight.copy_(wk.reshape(heads * dh, dh))
        layer.qkv.v.weight.copy_(wv.reshape(heads * dh, dh))
        layer.o_proj.weight.copy_(wo.reshape(dh, heads * dh))
    return model.eval()


def episodes(batch=64, context=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, context, D, generator=g)
    beta = torch.randn(batch, D, generator=g) / math.sqrt(D)
    y = (x @ beta[..., None]).squeeze(-1)
    xq = torch.randn(batch, D, generator=g)
    return x, y, xq, (xq * beta).sum(-1)


def test_planted_circuit_is_recovered_exactly():
    circuit = regression_circuit(planted())
    torch.testing.assert_close(circuit.omega, torch.tensor(OMEGA))
    torch.testing.assert_close(circuit.mu, torch.tensor(MU))
    for residual in (circuit.kq_off_identity, circuit.kq_outside, circuit.ov_off_label,
                     circuit.ov_outside):
        assert residual.abs().max() < 1e-6
    assert circuit.mu_balance == pytest.approx(0.0, abs=1e-6)  # 1.5 - 1 - 0.5
    assert circuit.step == pytest.approx(0.2 * 1.5 + 0.3 * 1.0 - 0.05 * 0.5)


def test_circuit_formula_equals_the_model_and_gd_is_its_first_order():
    model = planted()
    circuit = regression_circuit(model)
    x, y, xq, yq = episodes()
    pred = circuit_predictions(model, circuit, x, y, xq, yq)
    torch.testing.assert_close(pred.circuit, pred.model, rtol=1e-5, atol=1e-5)
    parts = head_contributions(model, x, y, xq)
    assert parts.shape == (64, 3)
    torch.testing.assert_close(parts.sum(-1), pred.model, rtol=1e-5, atol=1e-5)
    # head h alone = mu_h * softmax-weighted mean of y with temperature omega_h
    s = (x @ xq[..., None]).squeeze(-1)
    alone = MU[1] * (torch.softmax(OMEGA[1] * s, -1) * y).sum(-1)
    torch.testing.assert_close(parts[:, 1], alone, rtol=1e-5, atol=1e-5)
    # small omega: the debiased-GD expansion is close, plain averaging (mean of y kept) is
    # not, because the y_bar term cancels only in the former
    small = planted(omega=(0.02, -0.03, 0.005), mu=(15.0, -10.0, -5.0))
    c = regression_circuit(small)
    y_shift = y + 3.0  # a large mean of y, which the balanced heads must cancel
    p = circuit_predictions(small, c, x, y_shift, xq, yq)
    gd_error = (p.debiased_gd - p.model).abs().max()
    avg_error = (p.averaging - p.model).abs().max()
    assert gd_error < 0.05 * p.model.abs().max()
    assert avg_error > 10 * gd_error


def test_departures_from_the_form_are_measured():
    circuit = regression_circuit(planted(extra=0.5))
    # KQ[0, y] = omega * 0.5 * sqrt-free scale: outside share of the usable rows
    for h, w in enumerate(OMEGA):
        usable = D * w * w + (w * 0.5) ** 2
        assert circuit.kq_outside[h] == pytest.approx((w * 0.5) ** 2 / usable, rel=1e-4)
    assert circuit.kq_off_identity.abs().max() < 1e-6
    unbalanced = regression_circuit(planted(mu=(1.0, 1.0, 2.0)))
    assert unbalanced.mu_balance == pytest.approx(1.0)


def test_only_plain_one_layer_softmax_is_read():
    with pytest.raises(TypeError, match="ICLRegressor"):
        regression_circuit(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="one attention layer"):
        regression_circuit(ICLRegressor(D, heads=2, depth=2))
    with pytest.raises(ValueError, match="plain multi-head softmax"):
        regression_circuit(ICLRegressor(D, heads=2, mechanism="sigmoid"))
