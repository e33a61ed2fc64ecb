"""Built-in mechanisms; importing this package registers all of them."""

from attnlab.mechanisms.agent import AgentAttention
from attnlab.mechanisms.gated import GatedAttention
from attnlab.mechanisms.hedgehog import HedgehogAttention
from attnlab.mechanisms.inline import InjectiveLinearAttention
from attnlab.mechanisms.l2vit import L2ViTAttention
from attnlab.mechanisms.linear import LinearAttention
from attnlab.mechanisms.lla import LocalLinearAttention
from attnlab.mechanisms.mala import MagnitudeAwareLinearAttention
from attnlab.mechanisms.maxvit import MaxViTAttention
from attnlab.mechanisms.msa_conv import MSAConvAttention
from attnlab.mechanisms.neighborhood import NeighborhoodAttention
from attnlab.mechanisms.rfa import RandomFeatureAttention
from attnlab.mechanisms.selective import SelectiveAttention
from attnlab.mechanisms.shvit import SingleHeadAttention
from attnlab.mechanisms.sigmoid import SigmoidAttention
from attnlab.mechanisms.soft import SoftAttention
from attnlab.mechanisms.softmax import SoftmaxAttention
from attnlab.mechanisms.softplus import SoftplusAttention
from attnlab.mechanisms.spectral import SpectralGating

__all__ = [
    "AgentAttention",
    "GatedAttention",
    "HedgehogAttention",
    "InjectiveLinearAttention",
    "L2ViTAttention",
    "LinearAttention",
    "LocalLinearAttention",
    "MSAConvAttention",
    "MagnitudeAwareLinearAttention",
    "MaxViTAttention",
    "NeighborhoodAttention",
    "RandomFeatureAttention",
    "SelectiveAttention",
    "SigmoidAttention",
    "SingleHeadAttention",
    "SoftAttention",
    "SoftmaxAttention",
    "SoftplusAttention",
    "SpectralGating",
]
