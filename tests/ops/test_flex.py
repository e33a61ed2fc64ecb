"""FlexAttention formulations (logsigmoid + lse, log-softplus, two-pass LSSAR) equal the reference.

On CPU, FlexAttention runs eagerly (forward only); this checks the score_mod math that the CUDA
path compiles. The CUDA backward is exercised on a GPU machine, not in this suite.
"""

import pytest
import torch

from attnlab.ops.dispatch import flex_available

from .cases import OPS, key_padding, make_qkv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


FLEX_OPS = ["softmax", "sigmoid", "lssa", "lssar"]  # the ops with a FlexAttention backend


def _flex_cases() -> list:
    """(op_name, causal, masked, length) for every op. Each case costs 0.2 to 0.8 s on the
    2-core CPU whatever the length (FlexAttention's eager path), so the default run keeps, per
    op, the case with the most to get wrong (causal and key-padded, several blocks long) and
    the one-token edge; the other combinations run with ``-m slow``."""
    default = {(True, True, 257), (False, False, 1)}
    return [pytest.param(op_name, causal, masked, length,
                         id=f"{length}-{masked}-{causal}-{op_name}",
                         marks=[] if (causal, masked, length) in default
                         else [pytest.mark.slow, pytest.mark.numerics])
            for length in (1, 63, 257) for masked in (False, True) for causal in (False, True)
            for op_name in FLEX_OPS]


@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
@pytest.mark.parametrize("op_name, causal, masked, length", _flex_cases())
def test_flex_forward_matches_reference(op_name, causal, masked, length):
    op, _ = OPS[op_name]
    q, k, v = make_qkv(2, 4, 2, length, length, 16, torch.float32, requires_grad=False)
    mask = key_padding(2, length) if masked else None
    with torch.no_grad():
        out = op(q, k, v, causal=causal, mask=mask, backend="flex")
        ref = op(q.double(), k.double(), v.double(), causal=causal, mask=mask,
                 backend="reference")
    atol = 5e-4 if op_name == "lssar" else 5e-5
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-3)
