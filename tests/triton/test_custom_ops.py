"""The Triton kernels as PyTorch custom ops (issue 42): ``torch.compile(fullgraph=True)``
traces each kernel as one opaque node (forward and backward equal eager), ``torch.export``
exports a module calling it (a dynamic sequence length too), and ``torch.library.opcheck``
checks each op's registrations (schema, fake kernel, autograd, AOT dispatch with dynamic
shapes). Under Triton's interpreter on a machine without CUDA (conftest), on CUDA tensors
where there is a GPU. ``aot_eager`` traces the graph as inductor would (every graph break and
fake-kernel mismatch shows) without inductor's compile time.

The compiled and exported graphs call the very kernels that eager calls on the same inputs,
so they must agree exactly: the comparisons allow no tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attnlab.ops import decode_attention, linear_attention, sigmoid_attention
from attnlab.ops.triton.decode import decode, decode_op
from attnlab.ops.triton.linear import linear_bwd_op, linear_fwd_op, linear_sums
from attnlab.ops.triton.sigmoid import sigmoid_attention_triton, sigmoid_bwd_op, sigmoid_fwd_op

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def padding(b: int, lk: int) -> Tensor:
    """A key padding mask (B, 1, 1, Lk): batch 0 loses its first keys."""
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., : lk // 3] = False
    return keep.to(DEVICE)


def exactly(got: Tensor | tuple, want: Tensor | tuple) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def outputs_and_grads(f, *inputs: Tensor) -> tuple[Tensor, ...]:
    """f's output and the gradients of the inputs for the loss sum(out * fixed weights)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = f(*leaves)
    weights = randn(*out.shape, seed=99)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    return (out.detach(), *grads)


def compiled(f):
    torch._dynamo.reset()  # each test traces afresh (no cache shared between tests)
    return torch.compile(f, fullgraph=True, backend="aot_eager")


def check_export(module: torch.nn.Module, args: tuple[Tensor, ...], dynamic_shapes: tuple,
                 shorter: tuple[Tensor, ...], op: str) -> None:
    """Export ``module`` with static shapes (the shapes and dtypes the graph records for its
    outputs, which come from the op's fake kernel, are the real ones) and with the dynamic
    lengths (one node of ``op``; its outputs equal eager at the traced and at shorter
    lengths)."""
    want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    ep = torch.export.export(module, args)
    recorded = [n.meta["val"] for n in ep.graph.find_nodes(op="output")[0].args[0]]
    assert [(t.shape, t.dtype) for t in recorded] == [(t.shape, t.dtype) for t in want]
    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    nodes = [str(n.target) for n in ep.graph.nodes if str(n.target).startswith("attnlab.")]
    assert nodes == [f"attnlab.{op}.default"]
    exactly(ep.module()(*args), module(*args))
    exactly(ep.module()(*shorter), module(*shorter))


# ---------------------------------------------------------------- sigmoid (forward, backward)

def sigmoid_inputs() -> tuple[Tensor, ...]:
    """GQA (2 query heads on 1 kv head), odd lengths over two 16-row tiles, a per-head bias."""
    q, k, v = randn(1, 2, 17, 8, seed=0), randn(1, 1, 19, 8, seed=1), randn(1, 1, 19, 12, seed=2)
    return q, k, v, torch.tensor([-1.0, 0.5], device=DEVICE).view(2, 1, 1)


def sigmoid_call(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    return sigmoid_attention_triton(q, k, v, causal=True, mask=padding(1, 19), scale=0.4,
                                    bias=bias)


def test_sigmoid_compiles_as_one_graph_forward_and_backward():
    inputs = sigmoid_inputs()
    exactly(outputs_and_grads(compiled(sigmoid_call), *inputs),
            outputs_and_grads(sigmoid_call, *inputs))


class Sigmoid(torch.nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        return sigmoid_attention_triton(q, k, v, causal=False, mask=keep, scale=0.35,
                                        bias=-2.0)


def test_sigmoid_exports_with_a_dynamic_length():
    q, k, v, _ = sigmoid_inputs()
    keep = padding(1, 19)
    queries, keys = torch.export.Dim("queries", max=64), torch.export.Dim("keys", max=64)
    check_export(Sigmoid(), (q, k, v, keep), ({2: queries}, {2: keys}, {2: keys}, {3: keys}),
                 (q[:, :, :5], k[:, :, :11], v[:, :, :11], keep[..., :11]),
                 "sigmoid_triton_fwd")


def test_sigmoid_ops_pass_opcheck():
    q, k, v, bias = sigmoid_inputs()
    b = bias.reshape(2).float()
    grad = randn(1, 2, 17, 12, seed=3)
    torch.library.opcheck(sigmoid_fwd_op, (q.requires_grad_(), k, v, b.requires_grad_(),
                                           padding(1, 19), 0.4, True, None))
    torch.library.opcheck(sigmoid_bwd_op, (grad, q.detach(), k, v, b.detach(), None, 0.4,
                                           False, None, True))


# ------------------------------------------------------------------ linear (forward, backward)

def linear_inputs() -> tuple[Tensor, ...]:
    """Feature-mapped (positive) inputs, GQA, 33 tokens in chunks of 16."""
    fq = randn(1, 4, 33, 8, seed=4).exp()
    fk, v = randn(1, 2, 33, 8, seed=5).exp(), randn(1, 2, 33, 12, seed=6)
    return fq, fk, v


def linear_call(fq: Tensor, fk: Tensor, v: Tensor) -> Tensor:
    num, den = linear_sums(fq, fk, v, causal=True, chunk=16)
    return num / den[..., None]  # both outputs take part in the loss


def test_linear_compiles_as_one_graph_forward_and_backward():
    inputs = linear_inputs()
    exactly(outputs_and_grads(compiled(linear_call), *inputs),
            outputs_and_grads(linear_call, *inputs))


class Linear(torch.nn.Module):
    def forward(self, fq: Tensor, fk: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return linear_sums(fq, fk, v, causal=True, chunk=16)


def test_linear_exports_with_a_dynamic_length():
    fq, fk, v = linear_inputs()
    length = torch.export.Dim("length", min=2, max=64)
    check_export(Linear(), (fq, fk, v), ({2: length}, {2: length}, {2: length}),
                 tuple(t[:, :, :20] for t in (fq, fk, v)), "linear_triton_fwd")


def test_linear_ops_pass_opcheck():
    fq, fk, v = linear_inputs()
    dnum, dden = randn(1, 4, 33, 12, seed=7), randn(1, 4, 33, seed=8)
    torch.library.opcheck(linear_fwd_op, (fq.requires_grad_(), fk.requires_grad_(), v,
                                          True, 16))
    torch.library.opcheck(linear_bwd_op, (dnum, dden, fq.detach(), fk.detach(), v, False, 16))


# ----------------------------------------------------------------- decode (inference only)

def decode_inputs() -> tuple[Tensor, ...]:
    """3 queries of 4 heads over a cache of 37 keys on 2 kv heads, in 3 segments."""
    return randn(2, 4, 3, 8, seed=9), randn(2, 2, 37, 8, seed=10), randn(2, 2, 37, 8, seed=11)


def decode_call(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    return decode(q, k, v, causal=True, mask=keep, scale=0.3, splits=3)


def test_decode_compiles_as_one_graph():
    q, k, v = decode_inputs()
    keep = padding(2, 37)
    exactly(compiled(decode_call)(q, k, v, keep), decode_call(q, k, v, keep))


class Decode(torch.nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return decode(q, k, v, causal=False, mask=None, scale=0.3, splits=None)


def test_decode_exports_with_a_dynamic_cache_length():
    q, k, v = decode_inputs()
    cache = torch.export.Dim("cache", min=2, max=4096)
    check_export(Decode(), (q, k, v), (None, {2: cache}, {2: cache}),
                 (q, k[:, :, :5], v[:, :, :5]), "decode_triton_fwd")


def test_decode_op_passes_opcheck():
    q, k, v = decode_inputs()
    torch.library.opcheck(decode_op, (q.half(), k.half(), v.half(), padding(2, 37), True,
                                      0.3, 3))


def test_decode_has_no_backward():
    q, k, v = decode_inputs()
    out, _ = decode(q.requires_grad_(), k, v, causal=False, mask=None, scale=0.3, splits=2)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


# ------------------------------------------------- the ops themselves, with backend="triton"

def op_calls() -> dict[str, tuple]:
    """Each op called as a user would, with backend="triton", and inputs needing gradients
    (decode: inference only, none)."""
    q, k, v = randn(1, 2, 17, 8, seed=12), randn(1, 1, 17, 8, seed=13), randn(1, 1, 17, 8, seed=14)
    return {
        "sigmoid": (lambda q, k, v: sigmoid_attention(q, k, v, causal=True, bias=-2.0,
                                                      backend="triton"), (q, k, v)),
        "linear": (lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=16,
                                                    backend="triton"), (q, k, v)),
        "decode": (lambda q, k, v: decode_attention(q, k, v, causal=True, splits=2,
                                                    backend="triton"), (q[:, :, -2:], k, v)),
    }


@pytest.mark.parametrize("op", ["sigmoid", "linear", "decode"])
def test_the_ops_compile_as_one_graph(op):
    """The op's checks, dispatch and guards around the kernel trace too (fullgraph)."""
    f, inputs = op_calls()[op]
    if op == "decode":
        with torch.no_grad():
            exactly(compiled(f)(*inputs), f(*inputs))
    else:
        exactly(outputs_and_grads(compiled(f), *inputs), outputs_and_grads(f, *inputs))
