"""Magnitude-aware linear attention (MALA)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.linear import LinearFamily
from attnlab.modules.causal_conv import CausalConv1d
from attnlab.modules.gates import GATE_KINDS
from attnlab.modules.spatial import DepthwiseConv, grid_of
from attnlab.ops.common import row_counts, upcast
from attnlab.ops.linear import elu_plus_one, linear_attention, prefix_sums

LEPE_KERNEL = 5  # the official LePE: a 5 x 5 depthwise convolution (with bias) on V


def rope_2d(x: Tensor, grid: tuple[int, int], base: float) -> Tensor:
    """MALA's 2-D RoPE of (B, H, L, D) tokens on an (h, w) grid, D a multiple of 4: the first
    D/2 channels turn by the row index, the last D/2 by the column index, adjacent channels
    (2i, 2i + 1) as one pair; pair i of a half turns at base^-(i / (D/4 - 1)) (D/4 frequencies
    evenly spaced in the exponent from 1 to 1/base, each used by two pairs), in float32 as
    the official buffer holds them."""
    d = x.shape[-1]
    if d % 4:
        raise ValueError(f"mala: the 2-D RoPE needs a head_dim divisible by 4, got {d}")
    freq = 1.0 / (base ** torch.linspace(0, 1, d // 4, device=x.device))
    freq = freq.repeat_interleave(2).to(x.dtype)  # (D/2): a0 a0 a1 a1 ...
    rows = torch.arange(grid[0], device=x.device, dtype=x.dtype)[:, None] * freq
    cols = torch.arange(grid[1], device=x.device, dtype=x.dtype)[:, None] * freq
    angle = torch.cat([rows[:, None, :].expand(-1, grid[1], -1),
                       cols[None, :, :].expand(grid[0], -1, -1)], -1).flatten(0, 1)
    pairs = x.unflatten(-1, (d // 2, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return x * angle.cos() + turned * angle.sin()


class LinearGate(nn.Module):
    """MALA's output gate: the head outputs times o = W_o x + b_o, one factor per channel and
    no activation (the fourth quarter of the official ``qkvo`` projection)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(dim, heads * head_dim, bias=bias)

    def forward(self, heads_out: Tensor, x: Tensor) -> Tensor:
        """``heads_out`` (B, L, H, D), ``x`` (B, L, C) -> gated (B, L, H, D)."""
        return heads_out * self.proj(x).unflatten(-1, (self.heads, -1)).to(heads_out.dtype)


@register("mala", family="linear", paper="Rectifying Magnitude Neglect in Linear Attention",
          causal=True, bidirectional=True, decode=True, domains=("image", "seq"),
          complexity="n d^2", weights=True, cross=True,
          variants=({"gate": "linear", "rope": True, "bias": True},),
          notes="Vision (bidirectional) in the paper; the causal prefix form (means over "
                "j <= i) is an attnlab extension. gate='linear', local=True, rope=True, "
                "bias=True is the official AddLinearAttention (the authors' softmax "
                "baseline has the same gate, LePE and RoPE: backbone parts, off by default).")
class MagnitudeAwareLinearAttention(LinearFamily):
    """MALA: linear attention that keeps the query's magnitude.

    "Rectifying Magnitude Neglect in Linear Attention" (official code qhfan/MALA,
    ``AddLinearAttention``). phi = elu + 1, c = d^-1/2, over the N_i keys row i sees,
    z_i = c phi(q_i).mean_j phi(k_j), s_ij = c phi(q_i).phi(k_j),

        w_ij = (1 / N_i) [s_ij (1 + 1 / (z_i + eps)) - z_i],

    rows sum to z_i / (z_i + eps) (1 up to eps = 1e-6, the official constant), computed in
    linear time as o_i = (1/N_i)(1 + 1/(z_i + eps)) c phi(q_i) S_i - z_i mean_j v_j.
    Scaling q sharpens the weights (plain linear attention is invariant to it).

    ``rope=True``: as the official module, z from the unrotated features and s_ij from the
    rotated ones, R phi(q_i) . R phi(k_j) (a 2-D RoPE on images, the usual one on sequences).
    ``local=True``: LePE, a 5 x 5 depthwise convolution on V added to the output (causal: a
    depthwise convolution over the last 5 tokens, an attnlab extension).
    ``gate="linear"``: the output times W_o x + b_o before the output projection. With
    ``bias=True`` these three give the official module; they are off by default because the
    authors' softmax baseline (``VanillaSelfAttention``) has all three (backbone parts).
    The causal form (means over j <= i, a fixed-size state) is an attnlab extension.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "gate": Arg("str", optional=True, choices=("linear", *GATE_KINDS)),
        "local": Arg("bool"),
        "eps": Arg("float", low=0),
    }

    def __init__(self, dim: int, heads: int, *, gate: str | None = None, local: bool = False,
                 eps: float = 1e-6, **kwargs) -> None:
        super().__init__(dim, heads, gate=None if gate == "linear" else gate, **kwargs)
        self.eps, self.rope_base = eps, kwargs.get("rope_base", 10000.0)
        if gate == "linear":
            self.gate = LinearGate(dim, heads, self.head_dim, self.shape.bias)
        self.lepe = _lepe(heads * self.head_dim, self.causal) if local else None
        self.weights_reproduce_output = not local

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, call: Call
                ) -> tuple[Tensor, Tensor, Tensor]:
        """qk-norm only: RoPE turns the features after z is taken (``_rotate``)."""
        q, k = self.qk_norm(q, k)
        return q, k, v

    def _rotate(self, f: Tensor, call: Call) -> Tensor:
        if not self.uses_rope:
            return f
        if call.spatial is not None and len(call.spatial) == 2:
            return rope_2d(f, call.spatial, self.rope_base)
        return self.rotary(f, call.positions)

    def _sums(self, q: Tensor, k: Tensor, v: Tensor, call: Call):
        """A_i = R phi(q_i) . sum_j R phi(k_j) v_j^T, d_i = phi(q_i) . sum_j phi(k_j),
        V_i = sum_j v_j, N_i (R = identity without rope), updating the state."""
        fq, fk = elu_plus_one(q), elu_plus_one(k)
        a, d, vsum, n, new = prefix_sums(fq, fk, v, causal=self.causal, mask=call.op_mask,
                                         state=self.read_prefix(call))
        self.write_prefix(call, new)
        if self.uses_rope:
            rq, rk, rv = upcast(self._rotate(fq, call), self._rotate(fk, call), v)
            a = linear_attention(rq, rk, rv, causal=self.causal, feature_map="identity",
                                 normalize=False, mask=call.op_mask,
                                 state=self.read_state(call, "s0", "z0"),
                                 return_state=self.causal)
            if self.causal:
                a, (s0, z0) = a
                self.write_state(call, s0=s0, z0=z0)
        return a, d, vsum, n

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        a, d, vsum, n = self._sums(q, k, v, call)
        c = q.shape[-1] ** -0.5
        seen = n > 0
        n = n.clamp_min(1.0).unsqueeze(-1)
        z = (c * d).unsqueeze(-1) / n
        # the 1/(z + eps) term is (c A / N) / (z + eps) = A / (d + eps N / c): finite even
        # where z underflows to 0 (then A is 0 as well)
        den = d.unsqueeze(-1) + self.eps * n / c
        positive = den > 0
        normalised = a / torch.where(positive, den, 1.0) * positive
        out = (c * a - z * vsum) / n + normalised
        return (out * seen.unsqueeze(-1)).to(v.dtype)  # the sums are float32 at least

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        c = q.shape[-1] ** -0.5
        fq, fk = elu_plus_one(q), elu_plus_one(self.expand_kv(k))
        vis = self.visibility(q, k, call)
        s = c * (fq @ fk.transpose(-1, -2))
        if vis is not None:
            s = s.masked_fill(~vis, 0.0)
        n = row_counts(vis, s).clamp_min(1.0)
        z = s.sum(-1, keepdim=True) / n
        if self.uses_rope:
            s = c * (self._rotate(fq, call) @ self._rotate(fk, call).transpose(-1, -2))
        w = (s * (1 + 1 / (z + self.eps).clamp_min(1e-12)) - z) / n
        return w if vis is None else w.masked_fill(~vis, 0.0)

    def local_term(self, v: Tensor, call: Call) -> Tensor | None:
        if self.lepe is None:
            return None
        if call.context is not None:
            raise ValueError("mala: local=True (LePE) convolves the values on the queries' "
                             "grid; it is defined for self-attention, not context=")
        tokens = self.expand_kv(v).transpose(1, 2).flatten(2)  # (B, L, H D)
        if not self.causal:
            out = self.lepe(tokens, grid_of(v.shape[2], call.spatial), call.key_mask)
        else:  # the last inputs travel in the decoding state
            past = call.state.get("lepe") if call.state is not None else None
            out, history = self.lepe(tokens, call.key_mask, past)
            self.write_state(call, lepe=history)
        return self.split_heads(out, self.heads)


def _lepe(channels: int, causal: bool) -> nn.Module:
    """The official LePE (5 x 5 depthwise, with bias) on the token grid; causal: a depthwise
    convolution over the last 5 tokens (an attnlab extension: the grid one sees later tokens)."""
    if causal:
        return CausalConv1d(channels, LEPE_KERNEL, groups=channels)
    return DepthwiseConv(channels, LEPE_KERNEL)
