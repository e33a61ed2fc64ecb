"""``attnlab.Attention``: the one module contract every mechanism implements.

A forward pass runs the same steps for every mechanism::

    x (B, L, C) ─ validate ─ projection part ─> q, k, v ─ prepare (qk-norm, RoPE, temperatures)
      ─> hook_q/k/v ─ [state: append to the cache] ─ attend (or: attention_weights ->
      hook_weights -> @ v) ─> hook_heads (B, L, H, D) ─ gate ─ head_scale ─ output projection
      ─ post ─ dropout ─> hook_out; [state: advance the position, once]

A mechanism chooses its parts (``projection=``, ``qk_dim=``, ``output_projection=``,
``output_norm=``) and overrides the steps it changes: ``attend`` and ``attention_weights``
always, ``prepare``, ``local_term``, ``post`` or ``update_state`` where it needs to.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg, check_arguments
from attnlab.core.call import Call, HeadShape
from attnlab.core.hooks import HookPoint
from attnlab.core.masks import check_key_padding, rows_seeing, visibility
from attnlab.core.registry import MechanismInfo
from attnlab.core.state import State
from attnlab.modules.gates import GATE_KINDS, make_gate
from attnlab.modules.norms import QKNorm
from attnlab.modules.projections import QKVProjection, split_heads
from attnlab.modules.reset import reset_module
from attnlab.modules.rotary import NoRotation, Rotary
from attnlab.ops.common import expand_kv, nan_where

# the arguments every mechanism takes (``attnlab info NAME`` prints them), checked on
# construction: a wrong type or range names the argument, never fails inside torch
COMMON_ARGUMENTS: dict[str, Arg] = {
    "dim": Arg("int", low=1),
    "heads": Arg("int", low=1),
    "kv_heads": Arg("int", optional=True, low=1),
    "head_dim": Arg("int", optional=True, low=1),
    "qk_dim": Arg("int", optional=True, low=1),
    "causal": Arg("bool", optional=True),
    "dropout": Arg("float", low=0, high=1, high_open=True),
    "bias": Arg("bool"),
    "qk_norm": Arg("bool"),
    "rope": Arg("bool"),
    "rope_base": Arg("float", low=0, low_open=True),
    "gate": Arg("str", optional=True, choices=GATE_KINDS),
    "output_projection": Arg("bool"),
    "output_norm": Arg("bool"),
}


class Attention(nn.Module):
    """Base class of every attnlab mechanism (docs/contract.md, "The module contract").

    Args:
        dim: model width C (input and output channels).
        heads: number of query heads H.
        kv_heads: key/value heads (GQA; 1 = MQA); defaults to ``heads``.
        head_dim: per-head width D; defaults to ``dim // heads``.
        causal: position i sees keys j <= i. ``None`` picks the mechanism's only mode, or
            bidirectional when it supports both.
        dropout: dropout on the attention output (before the residual).
        bias: bias in the q, k, v and output projections.
        qk_norm: a norm on each head's q and k before the op (RMSNorm; sigmoid passes the
            official LayerNorm).
        rope: rotary position embedding on q and k (self-attention).
        gate: ``"headwise"`` or ``"elementwise"`` output gate (Gated Attention), or None.
        backend: op backend, ``"auto"`` picks the fastest correct one.
        rope_base: RoPE frequency base.

    Parts a mechanism chooses (passed by its constructor, not by users): ``projection``
    builds q, k, v from a :class:`HeadShape` (``attnlab.modules.projections``); ``qk_dim``
    is the per-head width of q and k (default ``head_dim``); ``output_projection=False``
    leaves the output projection to the mechanism (``o_proj`` is then the identity);
    ``output_norm=True`` puts a LayerNorm on the module output ("hybrid norm");
    ``rotary(qk_dim, rope_base)`` builds the RoPE module when ``rope`` is on (default
    :class:`Rotary`; e.g. a partial one).
    """

    mechanism: ClassVar[MechanismInfo | None] = None
    backends: ClassVar[tuple[str, ...]] = ("auto",)
    # made in __init__ by register_buffer / setattr (declared here for the type checker)
    head_scale: Tensor
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint
    hook_weights: HookPoint
    hook_heads: HookPoint
    hook_out: HookPoint

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        qk_norm: bool = False,
        rope: bool = False,
        gate: str | None = None,
        backend: str = "auto",
        rope_base: float = 10000.0,
        projection: Callable[[HeadShape], nn.Module] = QKVProjection,
        qk_dim: int | None = None,
        output_projection: bool = True,
        output_norm: bool = False,
        rotary: Callable[[int, float], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        info = self.mechanism
        self.name = info.name if info is not None else type(self).__name__
        check_arguments(self.name, COMMON_ARGUMENTS,
                        dict(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             causal=causal, dropout=dropout, bias=bias, qk_norm=qk_norm,
                             rope=rope, gate=gate, rope_base=rope_base, qk_dim=qk_dim,
                             output_projection=output_projection, output_norm=output_norm))
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"{self.name}: kv_heads={kv_heads} must divide heads={heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"{self.name}: dim={dim} is not divisible by heads={heads}; "
                                 "pass head_dim explicitly")
            head_dim = dim // heads
        if qk_dim is not None and qk_dim < 1:
            raise ValueError(f"{self.name}: qk_dim must be >= 1, got {qk_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got {dropout}")
        if gate is not None and gate not in GATE_KINDS:
            raise ValueError(f"{self.name}: gate must be one of {GATE_KINDS} or None, "
                             f"got {gate!r}")
        if backend not in self.backends:
            raise ValueError(f"{self.name}: unknown backend {backend!r}; "
                             f"choose from {self.backends}")
        causal = self._resolve_causal(causal)
        requested = {"kv_heads": kv_heads != heads, "qk_norm": qk_norm, "rope": rope,
                     "gate": gate is not None}
        for option in (info.unsupported if info else ()):
            if requested[option]:
                raise ValueError(f"{self.name} does not support the {option!r} option")

        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.causal, self.backend = causal, backend
        self.shape = HeadShape(dim, heads, kv_heads, head_dim, qk_dim or head_dim, bias)
        self.qkv = projection(self.shape)
        self.o_proj = (nn.Linear(heads * head_dim, dim, bias=bias) if output_projection
                       else nn.Identity())
        self.qk_norm = QKNorm(self.shape.qk_dim, qk_norm,
                              shared=getattr(self.qkv, "shared_qk", False))
        self.rotary = (rotary or Rotary)(self.shape.qk_dim, rope_base) if rope else \
            NoRotation()
        self.gate = make_gate(dim, heads, head_dim, gate)
        self.drop = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(dim) if output_norm else nn.Identity()
        self.register_buffer("head_scale", torch.ones(heads))
        for name in ("hook_q", "hook_k", "hook_v", "hook_weights", "hook_heads", "hook_out"):
            setattr(self, name, HookPoint())
        self._extra_loss: Tensor | None = None
        # whether the output is exactly weights() @ values (a mechanism's options may change it)
        self.weights_reproduce_output = info.weights_exact if info is not None else True

    # ------------------------------------------------------------------ construction helpers
    def _resolve_causal(self, causal: bool | None) -> bool:
        info = self.mechanism
        if info is None:
            return bool(causal)
        if causal is None:
            return not info.bidirectional
        if causal and not info.causal:
            raise ValueError(f"{self.name} supports only {info.modes} attention, "
                             "not causal=True")
        if not causal and not info.bidirectional:
            raise ValueError(f"{self.name} supports only {info.modes} attention, "
                             "not causal=False")
        return bool(causal)

    # the parts the base class builds, in the order it builds them (``reset_parameters``)
    BASE_PARTS: ClassVar[tuple[str, ...]] = ("qkv", "o_proj", "qk_norm", "rotary", "gate",
                                             "drop", "out_norm", "hook_q", "hook_k", "hook_v",
                                             "hook_weights", "hook_heads", "hook_out")

    def reset_parameters(self) -> None:
        """Re-initialise every parameter and buffer exactly as the constructor does (same
        distributions, zero and identity inits, fixed tables, ``head_scale`` = 1, RoPE
        frequencies recomputed in float32), drawing the random numbers in the constructor's
        order: after the same ``torch.manual_seed`` a reset module equals a built one.

        For meta-device (FSDP-style) initialisation: build under ``torch.device("meta")``,
        ``module.to_empty(device=...)``, then ``module.reset_parameters()``
        (docs/contract.md, "Meta-device initialisation"). Mechanisms extend ``_reset_own``
        (their own tensors and parts, in construction order) and, where they replace one of
        the base parts, ``_reset_part``."""
        with torch.no_grad():
            for name in self.BASE_PARTS:
                self._reset_part(name)
            self.head_scale.fill_(1.0)
            self._reset_own()

    def _reset_part(self, name: str) -> None:
        """Reset the base part ``name`` (one of ``BASE_PARTS``)."""
        reset_module(getattr(self, name))

    def _reset_own(self) -> None:
        """Reset what the mechanism adds to the base parts: by default every other child, in
        registration (= construction) order. Override it when the mechanism holds tensors of
        its own (and call ``reset_module`` for its parts in the order it built them)."""
        for name, child in self.named_children():
            if name not in self.BASE_PARTS:
                reset_module(child)

    @property
    def uses_rope(self) -> bool:
        """Whether q and k get rotary position embeddings (``rope=True``)."""
        return not isinstance(self.rotary, NoRotation)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, backend={self.backend!r}")

    # ------------------------------------------------------------------------ public API
    def forward(self, x: Tensor, *, mask: Tensor | None = None, state: State | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                spatial: tuple[int, ...] | None = None,
                positions: Tensor | None = None) -> Tensor:
        """``x`` (B, L, C), (B, H, W, C) or (B, T, H, W, C) -> output of the same shape.

        ``positions``: the tokens' absolute positions as the position encodings read them
        (RoPE; ``positions_refusal`` says where a mechanism refuses them), an integer tensor
        (L,) or (1, L) shared by the batch, or (B, L) per sequence, on x's device; by
        default the state's position + 0 .. L-1 (0 .. L-1 without a state). For a
        left-padded batch, each row counts from its first real token (pass ``mask=`` too).
        After a call with ``positions``, a state continues each row from its last position
        + 1. The causal order, windows, chunks and relative distances follow the tokens'
        order in the sequence, whatever ``positions`` says.
        """
        self._extra_loss = None  # extra_loss() always describes this forward
        call = self._begin(x, mask, state, context, context_mask, spatial, positions)
        if call.x.numel() == 0:  # no sequence (B = 0) or no token (L = 0): nothing to attend
            return x * 0
        if call.source.shape[1] == 0:  # a context without tokens: no query sees a key
            heads_out = call.x.new_zeros(call.x.shape[0], self.heads, call.x.shape[1],
                                         self.head_dim)
            return self._finish(heads_out, call, x.shape)
        q, k, v = self._qkv(call)
        if state is not None:
            k, v, call.key_mask = self.update_state(k, v, call)
        if self.hook_weights.active:
            if state is not None and not self.caches_keys:
                raise ValueError(f"{self.name}: hook_weights needs every key; a recurrent "
                                 "state keeps only their summary: capture the weights of a "
                                 "forward without a state (a converted model: use_cache=False)")
            w = self.hook_weights(self.attention_weights(q, k, call))
            heads_out = w.to(v.dtype) @ self.expand_kv(v)
        else:
            heads_out = self.attend(q, k, v, call)
        local = self.local_term(v, call)
        if local is not None:
            heads_out = heads_out + local
        out = self._finish(heads_out, call, x.shape)
        seen = self._seen_nonfinite(call)
        if seen is not None:
            out = out + nan_where(seen, out).reshape(*x.shape[:-1], 1)
        if state is not None:
            state.advance(call.x.shape[1])
        return out

    if TYPE_CHECKING:  # nn.Module.__call__ is typed as returning Any; a call runs forward
        __call__ = forward

    def weights(self, x: Tensor, *, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None,
                spatial: tuple[int, ...] | None = None,
                positions: Tensor | None = None) -> Tensor:
        """The attention matrix ``(B, H, Lq, Lk)`` the mechanism implies, computed densely
        (``positions`` as in ``forward``)."""
        if self.mechanism is not None and not self.mechanism.weights:
            raise ValueError(f"{self.name} defines no attention matrix")
        call = self._begin(x, mask, None, context, context_mask, spatial, positions)
        if call.x.numel() == 0 or call.source.shape[1] == 0:
            return call.x.new_zeros(call.x.shape[0], self.heads, call.x.shape[1],
                                    call.source.shape[1])
        q, k, _ = self._qkv(call)
        w = self.attention_weights(q, k, call)
        seen = self._seen_nonfinite(call)
        return w if seen is None else w + nan_where(seen, w).unsqueeze(1)

    caches_keys: ClassVar[bool] = True  # False: the state keeps a summary, not every key
    # why the mechanism refuses ``positions=`` (None: it reads (L,) and (B, L) positions
    # wherever it reads positions; judged from the class, never from the data)
    positions_refusal: ClassVar[str | None] = None

    def new_state(self, batch_size: int) -> State:
        """A fresh decoding state for ``batch_size`` sequences."""
        self._check_can_decode()
        return State(self.name, batch_size, module=self)

    def extra_loss(self) -> Tensor:
        """Auxiliary loss of the last forward (0 unless the mechanism defines one)."""
        if self._extra_loss is not None:
            return self._extra_loss
        return self.head_scale.new_zeros(())

    # ------------------------------------------------------------- steps to override
    def prepare(self, q: Tensor, k: Tensor, v: Tensor, call: Call
                ) -> tuple[Tensor, Tensor, Tensor]:
        """qk-norm and RoPE; mechanisms add temperatures or convolutions here."""
        q, k = self.qk_norm(q, k)
        pair = getattr(self.rotary, "rotate_pair", None)  # cos and sin once for q and k
        if pair is not None:
            q, k = pair(q, k, call.positions)
            return q, k, v
        return self.rotary(q, call.positions), self.rotary(k, call.positions), v

    def update_state(self, k: Tensor, v: Tensor, call: Call
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append to the KV cache; return all cached keys, values and their padding mask
        (None while no call of the state has had padding: every cached key is real, and the
        op runs without a mask instead of a mask of ones, which cost each decoding step
        passes over the whole cache)."""
        state, b, length = call.state, k.shape[0], k.shape[2]
        assert state is not None  # called with a state only
        keep = call.key_mask
        cached_keep = state.get("key_mask")
        if keep is None and cached_keep is None:
            return state.append("k", k, dim=2), state.append("v", v, dim=2), None
        if keep is None:
            keep = torch.ones(b, length, dtype=torch.bool, device=k.device)
        elif cached_keep is None:  # the first padding: the keys cached before it are real
            earlier = state.get("k")
            if earlier is not None and earlier.shape[2]:
                state.append("key_mask", torch.ones(b, earlier.shape[2], dtype=torch.bool,
                                                    device=k.device), dim=1)
        return (state.append("k", k, dim=2), state.append("v", v, dim=2),
                state.append("key_mask", keep, dim=1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """The op: q (B, H, Lq, D), k, v (B, H_kv, Lk, D) -> per-head output (B, H, Lq, D)."""
        raise NotImplementedError

    def post(self, y: Tensor, call: Call) -> Tensor:
        """After the output projection, (B, L, C): the output norm (identity unless
        ``output_norm``); mechanisms with a module on the output override this."""
        return self.out_norm(y)

    def local_term(self, v: Tensor, call: Call) -> Tensor | None:
        """A per-head term added to the attention output that is not attention (e.g. a
        convolution on V), (B, H, Lq, D); None by default. ``weights()`` does not include it."""
        return None

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        """Dense implied attention matrix (B, H, Lq, Lk) from the prepared q and k."""
        raise NotImplementedError(f"{self.name} does not implement attention_weights")

    propagates_nonfinite: ClassVar[bool] = False

    def nonfinite_reach(self, marked: Tensor, call: Call) -> Tensor:
        """Bool (B, Lq): the outputs that may see one of the ``marked`` (B, Lk) tokens (real
        tokens of this call that held a non-finite number; when decoding, a marked token of
        an earlier call reaches every later output, which the state remembers in one flag).

        ``forward`` sets such tokens to 0 before the projections, so that a token an output
        cannot see (padding, a causal future) never reaches it whatever it holds (0 x NaN
        is NaN in a weighted sum), and makes NaN the outputs this returns: by default every
        output in bidirectional or cross-attention, the token's position and the later ones
        in causal attention. A mechanism whose steps keep non-finite inputs away from the
        outputs that cannot see them (guarded ops, ``ops.common.guarded_op``) sets
        ``propagates_nonfinite = True`` instead, and its inputs pass through untouched.
        """
        return rows_seeing(marked, call.x.shape[1], causal=self.causal)

    def _seen_nonfinite(self, call: Call) -> Tensor | None:
        if call.nonfinite is None:
            return None
        seen = self.nonfinite_reach(call.nonfinite, call)
        if call.state is not None and self.causal:  # a marked earlier token reaches them all
            before = call.state.get("nonfinite_before")
            if before is not None:
                seen = seen | before[:, None]
            call.state.put(nonfinite_before=seen[:, -1])  # (forward returned before L = 0)
        return seen

    # ----------------------------------------------------------------------- helpers
    split_heads = staticmethod(split_heads)

    def visibility(self, q: Tensor, k: Tensor, call: Call) -> Tensor | None:
        """Bool (.., Lq, Lk) of the keys each query may see (causal and padding), or None."""
        return visibility(q.shape[2], k.shape[2], causal=self.causal, mask=call.op_mask,
                          device=q.device)

    def expand_kv(self, t: Tensor) -> Tensor:
        """Repeat the kv heads of (B, H_kv, L, D) so that they line up with the query heads."""
        return expand_kv(t, self.heads)

    def _check_can_decode(self) -> None:
        info = self.mechanism
        if info is not None and not info.decode:
            raise ValueError(f"{self.name} cannot decode with a state (decode=False)")
        if not self.causal:
            raise ValueError(f"{self.name}: decoding with a state needs causal=True")

    def _begin(self, x, mask, state, context, context_mask, spatial, positions=None) -> Call:
        who = self.name
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{who}: x must be a floating-point tensor")
        if x.dim() not in (3, 4, 5):
            raise ValueError(f"{who}: x must be (B, L, C), (B, H, W, C) or (B, T, H, W, C), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{who}: expected {self.dim} channels in the last dim of x "
                             f"(dim={self.dim}), got shape {tuple(x.shape)}")
        if x.dim() > 3:
            if spatial is not None and tuple(spatial) != tuple(x.shape[1:-1]):
                raise ValueError(f"{who}: spatial={tuple(spatial)} contradicts x of shape "
                                 f"{tuple(x.shape)}")
            spatial = tuple(x.shape[1:-1])
        elif spatial is not None:
            if not isinstance(spatial, (tuple, list)) or not all(
                    isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1
                    for s in spatial):
                raise ValueError(f"{who}: spatial must be (H, W) or (T, H, W) of ints >= 1, "
                                 f"got {spatial!r}")  # (-3, -3) passed for L = 9
            spatial = tuple(int(s) for s in spatial)
            if len(spatial) not in (2, 3) or math.prod(spatial) != x.shape[1]:
                raise ValueError(f"{who}: spatial={spatial} does not match sequence length "
                                 f"{x.shape[1]}")
        param = next(self.parameters(), None)
        if param is not None and param.is_floating_point() and x.dtype != param.dtype and \
                not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{who}: x is {x.dtype} but the module's parameters are "
                             f"{param.dtype}; convert one (module.to({x.dtype}) or "
                             f"x.to({param.dtype})) or run under torch.autocast")
        info = self.mechanism
        if info is not None and "seq" not in info.domains and spatial is None:
            raise ValueError(f"{who} works on {'/'.join(info.domains)} inputs: pass "
                             "(B, H, W, C) or spatial=(H, W)")
        b = x.shape[0]
        seq = x.reshape(b, math.prod(x.shape[1:-1]), self.dim)  # (-1 fails when B = 0)
        length = seq.shape[1]
        key_mask = check_key_padding(mask, b, length, who, spatial)
        if context is not None:
            if info is not None and not info.cross:
                raise ValueError(f"{who} does not support cross-attention (context=)")
            if self.causal:
                raise ValueError(f"{who}: cross-attention (context=) needs causal=False")
            if self.uses_rope:
                raise ValueError(f"{who}: rope is defined for self-attention, not context=")
            if not isinstance(context, Tensor) or context.dim() != 3 or \
                    context.shape[0] != b or context.shape[-1] != self.dim:
                got = tuple(context.shape) if isinstance(context, Tensor) else type(context)
                raise ValueError(f"{who}: context must be (B, Lk, C) = ({b}, Lk, {self.dim}), "
                                 f"got {got}")
            if (context.dtype, context.device) != (x.dtype, x.device):
                raise ValueError(f"{who}: context is {context.dtype} on {context.device}, x "
                                 f"is {x.dtype} on {x.device}: give both the same dtype and "
                                 "device")
            if mask is not None:
                raise ValueError(f"{who}: with context=, pass the key padding as context_mask")
            key_mask = check_key_padding(context_mask, b, context.shape[1], who)
        elif context_mask is not None:
            raise ValueError(f"{who}: context_mask given without context")
        offset = 0
        if state is not None:
            self._check_can_decode()
            if not isinstance(state, State):
                raise ValueError(f"{who}: state must come from new_state(), got "
                                 f"{type(state).__name__}")
            if context is not None:
                raise ValueError(f"{who}: a state cannot be combined with context=")
            state.check(who, b, self)
            offset = state.position
        index = torch.arange(offset, offset + length, device=x.device)
        given = self._positions(positions, x, b, length, context, spatial)
        if state is not None and given is None:
            given = _continued(state, length)
        if state is not None and given is not None and length:
            # where the next call continues, per row (also after (L,) positions)
            state.put(last_positions=given[..., -1:].expand(b, 1))
        if key_mask is not None and context is not None:
            # context tokens are only keys and values: padded ones are 0, whatever they hold
            context = context.masked_fill(~key_mask.unsqueeze(-1), 0)
        elif key_mask is not None:
            # a padded token is 0 before any projection, whatever it holds: a huge finite one
            # would overflow there, and 0 x inf or 0 x NaN is NaN in a weight gradient
            seq = seq.masked_fill(~key_mask.unsqueeze(-1), 0)
        nonfinite = None
        if not self.propagates_nonfinite:
            if context is None:
                seq, nonfinite = _zero_nonfinite(seq, key_mask)
            else:
                context, nonfinite = _zero_nonfinite(context, key_mask)
        if given is None:
            return Call(seq, index, key_mask, spatial, state, context, nonfinite=nonfinite)
        return Call(seq, given, key_mask, spatial, state, context, nonfinite=nonfinite,
                    sequence_index=index)

    def _positions(self, positions, x: Tensor, b: int, length: int, context, spatial
                   ) -> Tensor | None:
        """``positions=`` checked (None when not given): an integer (L,) or (B, L) tensor on
        x's device ((1, L) becomes (L,)), of self-attention on a sequence, for a mechanism
        that reads it."""
        if positions is None:
            return None
        who = self.name
        if self.positions_refusal is not None:
            raise ValueError(f"{who} refuses positions=: {self.positions_refusal}")
        if not isinstance(positions, Tensor) or positions.is_floating_point() or \
                positions.is_complex() or positions.dtype == torch.bool:
            got = positions.dtype if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"{who}: positions must be an integer tensor (the tokens' "
                             f"absolute positions), got {got}")
        if context is not None:
            raise ValueError(f"{who}: positions= number the tokens of self-attention; "
                             "cross-attention (context=) takes none")
        if spatial is not None:
            raise ValueError(f"{who}: positions= number the tokens of a sequence; an image or "
                             "video input is placed by its grid (spatial), not by positions")
        if positions.dim() == 2 and positions.shape[0] == 1 and b != 1:
            positions = positions[0]  # (1, L), transformers' usual shape: shared by the batch
        if tuple(positions.shape) not in ((length,), (b, length)):
            raise ValueError(f"{who}: positions must be (L,) = ({length},), (1, L) or (B, L) = "
                             f"({b}, {length}), got shape {tuple(positions.shape)}")
        if positions.device != x.device:
            raise ValueError(f"{who}: positions are on {positions.device}, x on {x.device}")
        return positions

    def _qkv(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(call)
        pad = _padded_rows(call)
        if pad is not None:
            # a padded token (0 since _begin) is no key and no value: its projections' biases
            # stay out of the sums over keys too
            k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
        q, k, v = self.prepare(q, k, v, call)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def _finish(self, heads_out: Tensor, call: Call, shape: torch.Size) -> Tensor:
        h = self.hook_heads(heads_out.transpose(1, 2))  # (B, L, H, D)
        h = self.gate(h, call.x)
        h = h * self.head_scale.to(h.dtype).view(1, 1, -1, 1)
        y = self.drop(self.post(self.o_proj(h.flatten(2)), call))
        return self.hook_out(y).reshape(shape)


def _continued(state: State, length: int) -> Tensor | None:
    """(B, L) positions continuing those a state's earlier call was given (``positions=``),
    or None when its calls took the default."""
    start = state.get("last_positions")  # (B, 1): the last position given
    if start is None:
        return None
    return start + torch.arange(1, length + 1, device=start.device)


def _padded_rows(call: Call) -> Tensor | None:
    """Bool (B, 1, L, 1): this call's padded tokens of self-attention (None: no padding, or
    cross-attention, whose padding is the context's)."""
    if call.key_mask is None or call.context is not None:
        return None
    return ~call.key_mask[:, None, :, None]


def _zero_nonfinite(tokens: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``tokens`` (B, L, C) with every token holding a non-finite number set to 0, and the
    real (unpadded) ones among them, bool (B, L)."""
    bad = ~torch.isfinite(tokens).all(-1)
    marked = bad if key_mask is None else key_mask & bad
    return tokens.masked_fill(bad.unsqueeze(-1), 0), marked
