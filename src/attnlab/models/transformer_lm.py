"""A pre-norm decoder-only language model built from any registered mechanism(s)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnlab.core.registry import info
from attnlab.core.state import State
from attnlab.models.blocks import Block, layer_specs, sum_extra_losses

POSITIONS = ("rope", "learned", "none")


class TransformerLM(nn.Module):
    """Causal language model: embeddings, ``depth`` pre-norm blocks, tied output head.

    Args:
        vocab: vocabulary size.
        dim, depth, heads: width, number of blocks, attention heads.
        mechanism: a registered name, or one name per layer.
        mechanism_kwargs: keyword arguments for the mechanism(s): one dict, or one per layer.
        positions: ``"rope"`` (rotary, in each attention), ``"learned"`` (absolute
            embeddings up to ``max_len``) or ``"none"``.
    """

    def __init__(self, vocab: int, dim: int = 128, depth: int = 2, heads: int = 4,
                 mechanism: str | Sequence[str] = "softmax",
                 mechanism_kwargs: dict | Sequence[dict] | None = None, *,
                 positions: str = "rope", max_len: int = 2048, mlp_ratio: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        specs = layer_specs(mechanism, mechanism_kwargs, depth)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim) if positions == "learned" else None
        self.max_len = max_len
        blocks = []
        for name, kw in specs:
            kw = {"causal": True, **kw}
            if positions == "rope" and "rope" not in info(name).unsupported:
                kw.setdefault("rope", True)
            blocks.append(Block(dim, heads, name, kw, mlp_ratio, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.mechanisms = [name for name, _ in specs]
        # N(0, 0.02) as in GPT-2: with tied weights, N(0, 1) embeddings make the first logits
        # huge (loss ~40 at vocab 16) and training collapses to the unigram distribution.
        for emb in (self.embed, self.pos):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

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
        return [b.attn.new_state(batch_size) for b in self.blocks]

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
