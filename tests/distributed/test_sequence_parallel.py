"""Sequence-parallel attention with the gloo backend on 1, 2 and 4 CPU processes: every
rank's output and gradients equal the single-process op's on its piece (to 1e-5, fp32),
for softmax, sigmoid, softplus and linear attention, causal and bidirectional, with and
without key padding, GQA, and pieces of unequal length; a dead or stalled peer raises."""

import pytest
import torch
import torch.multiprocessing as mp

from attnlab.distributed import SEQUENCE_PARALLEL_KINDS, sequence_parallel_attention
from tests.distributed.workers import agreement, dead_peer

CASES = [(kind, causal, padded, kv_heads, 11) for kind in SEQUENCE_PARALLEL_KINDS
         for causal in (False, True) for padded in (False, True) for kv_heads in (4, 2)]
# 5 positions: on 4 ranks, pieces of 2, 1, 1, 1 (a one-token piece sees its own block)
CASES += [(kind, True, False, 2, 5) for kind in SEQUENCE_PARALLEL_KINDS]


def results(folder, world):
    return {r: (folder / f"rank{r}.txt").read_text() for r in range(world)}


# world 2 in the default run (~4 s); 1 and 4 with -m slow (the default pytest stays < 3 min)
@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.slow), 2,
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_every_kind_matches_the_single_process_op(tmp_path, world):
    mp.spawn(agreement, args=(world, str(tmp_path / "init"), CASES, str(tmp_path)),
             nprocs=world)
    assert results(tmp_path, world) == {r: "ok" for r in range(world)}


@pytest.mark.slow  # ~3 s each, processes: .ci/run runs them (pytest -m slow)
@pytest.mark.parametrize("how", ["exit", "stall"])
def test_a_dead_or_stalled_peer_raises_instead_of_hanging(tmp_path, how):
    mp.spawn(dead_peer, args=(2, str(tmp_path / "init"), str(tmp_path), how), nprocs=2)
    outcome = (tmp_path / "rank0.txt").read_text()
    assert outcome.startswith("raised RuntimeError"), outcome
    if how == "stall":
        assert "Timed out" in outcome


def test_clear_errors_before_any_communication():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="kind must be one of"):
        sequence_parallel_attention(q, q, q, kind="cosine")
    with pytest.raises(ValueError, match="same positions"):
        sequence_parallel_attention(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="key_mask must be bool"):
        sequence_parallel_attention(q, q, q, key_mask=torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_attention(q, q, q)  # this process never joined a group
