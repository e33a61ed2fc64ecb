"""Linear attention (feature maps elu+1, relu, identity) and the DSF normalised attention."""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.reset import reset_module
from attnlab.ops.linear import BACKENDS, FEATURE_MAPS, linear_attention, safe_divide

VARIANTS = ("normalized", "dsf")


class LinearFamily(Attention):
    """Shared plumbing of the linear family: a fixed-size recurrent state, no KV cache."""

    caches_keys = False  # the state holds prefix sums, not the keys

    def update_state(self, k: Tensor, v: Tensor, call: Call):
        return k, v, call.key_mask  # the mechanism folds the keys into its state in attend

    @staticmethod
    def read_state(call: Call, *names: str) -> tuple[Tensor, ...] | None:
        """The named tensors of the call's state, or None (no state, or its first call)."""
        st = call.state
        if st is None or st.get(names[0]) is None:
            return None
        return tuple(cast(Tensor, st.get(n)) for n in names)  # saved together

    def read_prefix(self, call: Call):
        """The ``prefix_sums`` state ((S1, z1), (S2, z2)) kept in the call's state, or None."""
        t = self.read_state(call, "s1", "z1", "s2", "z2")
        return None if t is None else ((t[0], t[1]), (t[2], t[3]))

    def write_prefix(self, call: Call, new) -> None:
        if new is not None:
            (s1, z1), (s2, z2) = new
            self.write_state(call, s1=s1, z1=z1, s2=s2, z2=z2)

    def kernel_scores(self, phi, q: Tensor, k: Tensor, call: Call
                      ) -> tuple[Tensor, Tensor | None]:
        """phi(q) phi(k)^T (B, H, Lq, Lk) with invisible pairs at 0, and the visibility."""
        scores = phi(q) @ phi(self.expand_kv(k)).transpose(-1, -2)
        vis = self.visibility(q, k, call)
        return (scores if vis is None else scores.masked_fill(~vis, 0.0)), vis

    @staticmethod
    def write_state(call: Call, **tensors: Tensor) -> None:
        """Store the new state tensors (no-op without a state)."""
        if call.state is not None:
            call.state.put(**tensors)


@register("linear", family="linear",
          paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
          causal=True, bidirectional=True, decode=True, domains=("seq", "image"),
          complexity="n d^2", weights=True, cross=True,
          variants=({"feature_map": "relu"}, {"feature_map": "identity", "variant": "dsf"},
                    {"backend": "recurrent"}, {"backend": "parallel"}))
class LinearAttention(LinearFamily):
    """Linear attention: y_i = phi(q_i) S_i / phi(q_i) z_i, S_i = sum_j phi(k_j) v_j^T.

    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"
    (Katharopoulos et al.), in the dynamical-systems view of "Understanding the differences in
    Foundation Models: Attention, State Space Models, and Recurrent Neural Networks":
    S_i = S_{i-1} + phi(k_i) v_i^T, z_i = z_{i-1} + phi(k_i), a state of fixed size.
    ``feature_map``: ``elu`` (elu + 1, default), ``relu``, ``identity``.
    ``variant="dsf"``: the DSF normalised attention y_t = sum_{s<=t} (q_t.k_s) v_s / exp(n_t),
    n_t = W_n x_t, one scalar per head (identity feature map recommended).
    ``backend``: ``chunked`` (the default for ``auto``), ``parallel`` or ``recurrent`` (the
    three forms of the op, which agree).
    """

    backends = ("auto", *BACKENDS)

    arguments: ClassVar[dict[str, Arg]] = {
        "feature_map": Arg("str", choices=tuple(sorted(FEATURE_MAPS))),
        "variant": Arg("str", choices=VARIANTS),
        "chunk_size": Arg("int", low=1),
    }

    def __init__(self, dim: int, heads: int, *, feature_map: str = "elu",
                 variant: str = "normalized", chunk_size: int = 64, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.feature_map, self.variant, self.chunk_size = feature_map, variant, chunk_size
        self.normalizer = nn.Linear(dim, heads) if variant == "dsf" else None
        if self.normalizer is not None:
            with torch.no_grad():
                self._zero_normalizer()

    def _zero_normalizer(self) -> None:
        # zero-init (after nn.Linear's own draws): the normaliser starts at a constant
        assert self.normalizer is not None  # variant "dsf"
        nn.init.zeros_(self.normalizer.weight)
        nn.init.zeros_(self.normalizer.bias)

    def _reset_own(self) -> None:
        if self.normalizer is not None:
            reset_module(self.normalizer)
            self._zero_normalizer()

    def _dsf_scale(self, call: Call) -> Tensor:
        assert self.normalizer is not None  # variant "dsf"
        return torch.exp(-self.normalizer(call.x)).transpose(1, 2).unsqueeze(-1)  # (B,H,L,1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        decoding = call.state is not None
        out = linear_attention(q, k, v, causal=self.causal, feature_map=self.feature_map,
                               normalize=self.variant == "normalized", backend=self.backend,
                               chunk_size=self.chunk_size, mask=call.op_mask,
                               state=self.read_state(call, "S", "z"), return_state=decoding)
        if decoding:
            out, (s, z) = out
            self.write_state(call, S=s, z=z)
        return out * self._dsf_scale(call) if self.normalizer is not None else out

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        a, _ = self.kernel_scores(FEATURE_MAPS[self.feature_map], q, k, call)
        if self.normalizer is not None:
            return a * self._dsf_scale(call)
        return safe_divide(a, a.sum(-1), 1e-6)
