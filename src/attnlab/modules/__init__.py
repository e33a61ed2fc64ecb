"""Parts that mechanisms are built from: projections, qk-norm, rotary, output gates, causal
convolutions and spatial helpers. Each mechanism chooses its parts; the base class
(``attnlab.mechanisms.base.Attention``) wires them into the contract."""

from attnlab.modules.gates import NoGate, OutputGate
from attnlab.modules.norms import QKNorm
from attnlab.modules.projections import (
    QKVProjection,
    SharedQKProjection,
    ValueProjection,
    split_heads,
)
from attnlab.modules.rotary import NoRotation, Rotary

__all__ = ["NoGate", "NoRotation", "OutputGate", "QKNorm", "QKVProjection", "Rotary",
           "SharedQKProjection", "ValueProjection", "split_heads"]
