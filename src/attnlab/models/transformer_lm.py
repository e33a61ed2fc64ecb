"""A pre-norm decoder-only language model built from any registered mechanism(s)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from attnlab.core.registry import info
from attnlab.core.state import State
from attnlab.models.blocks import Block, layer_specs, sum_extra_losses

POSITIONS = ("rope", "learned", "none")


def takes_length(mechanism: str) -> bool:
    """Whether the mechanism's constructor takes the training length (``max_len``), as
    sigmoid attention does for its bias b = -ln(n)."""
    return "max_len" in info(mechanism).defaults


class TransformerLM(nn.Module):
    """Causal language model: embeddings, ``depth`` pre-norm blocks, an output head.

    Args:
        vocab: vocabulary size.
        dim, depth, heads: width, number of blocks, attention heads.
        mechanism: a registered name, one name per layer, or per-layer names joined by
            ``+`` (a hybrid: ``"softmax+linear"`` is softmax in layer 0, linear in layer 1).
        mechanism_kwargs: keyword arguments for the mechanism(s): one dict, or one per layer.
        positions: ``"rope"`` (rotary, in each attention), ``"learned"`` (absolute
            embeddings up to ``max_len``) or ``"none"``.
        tie_embeddings: share the output head's weight with the token embedding (GPT-2).
            Default False.
        embed_std: standard deviation of the token (and learned position) embeddings at
            initialisation. Default 0.1. Measured in docs/results/recipe.md (dim 64,
            softmax, 1,200 steps): N(0, 0.02) (GPT-2's, here tied or not) stalls MQAR at
            0.52 accuracy, N(0, 1) stalls induction at 0.10, N(0, 0.1) and N(0, 0.3)
            solve both (1.0).
        mlp_ratio: hidden width of each block's MLP as a multiple of ``dim``. Default 4.
            0 builds an attention-only model: blocks x + attn(norm(x)) with no MLP and no
            second norm (the two-layer attention-only models in which induction heads are
            studied).
        train_length: the training context length, passed as ``max_len`` to every
            mechanism whose constructor takes one (sigmoid's bias b = -ln n) unless its
            kwargs set it. None leaves the mechanism's own default.
    """

    def __init__(self, vocab: int, dim: int = 128, depth: int = 2, heads: int = 4,
                 mechanism: str | Sequence[str] = "softmax",
                 mechanism_kwargs: dict | Sequence[dict] | None = None, *,
                 positions: str = "rope", max_len: int = 2048, mlp_ratio: int = 4,
                 dropout: float = 0.0, tie_embeddings: bool = False, embed_std: float = 0.1,
                 train_length: int | None = None) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if embed_std <= 0:
            raise ValueError(f"embed_std must be > 0, got {embed_std}")
        if train_length is not None and train_length < 1:
            raise ValueError(f"train_length must be >= 1, got {train_length}")
        specs = layer_specs(mechanism, mechanism_kwargs, depth)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim) if positions == "learned" else None
        self.max_len = max_len
        blocks = []
        for name, kw in specs:
            kw = {"causal": True, **kw}
            if train_length is not None and takes_length(name):
                kw.setdefault("max_len", train_length)
            if positions == "rope" and "rope" not in info(name).unsupported:
                kw.setdefault("rope", True)
            blocks.append(Block(dim, heads, name, kw, mlp_ratio, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.mechanisms = [name for name, _ in specs]
        for emb in (self.embed, self.pos):
            if emb is not None:
                nn.init.normal_(emb.weight, std=embed_std)

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None,
                states: list[State] | None = None) -> Tensor:
        """tokens (B, L) -> logits (B, L, vocab). ``states`` from ``new_states`` to decode."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int, torch.int16):
            raise ValueError(f"tokens must be an integer tensor (B, L), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        x = self.embed(tokens)
        if self.pos is not None:
            start = 0 if states is None else states[0].position
            if start + tokens.shape[1] > self.max_len:
                raise ValueError(f"sequence of {start + tokens.shape[1]} tokens exceeds "
                                 f"max_len={self.max_len} of the learned positions")
            x = x + self.pos(torch.arange(start, start + tokens.shape[1], device=x.device))
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if states is None else states[i])
        return self.head(self.norm(x))

    def extra_loss(self) -> Tensor:
        """Sum of the mechanisms' auxiliary losses of the last forward."""
        return sum_extra_losses((b.attn for b in self.blocks), self.head.weight)

    def new_states(self, batch_size: int) -> list[State]:
        """One decoding state per layer."""
        return [cast(Block, b).attn.new_state(batch_size) for b in self.blocks]

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (B, L), decoding with the states.

        ``temperature=0`` is greedy. Returns (B, L + max_new_tokens).
        """
        states = self.new_states(prompt.shape[0])
        logits = self(prompt, states=states)[:, -1]
        out = [prompt]
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                scaled = logits / temperature
                if top_k is not None:
                    kth = scaled.topk(top_k, dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(scaled.softmax(-1), 1, generator=generator)
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self(nxt, states=states)[:, -1]
        return torch.cat(out, dim=1)
