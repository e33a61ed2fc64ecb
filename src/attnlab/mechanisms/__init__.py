"""Built-in mechanisms; importing this package registers all of them."""

from attnlab.mechanisms.agent import AgentAttention
from attnlab.mechanisms.cca import CompressedConvolutionalAttention
from attnlab.mechanisms.dma import DynamicMaskAttention
from attnlab.mechanisms.gaam import GaussianAdaptiveAttention
from attnlab.mechanisms.gated import GatedAttention
from attnlab.mechanisms.hedgehog import HedgehogAttention
from attnlab.mechanisms.inline import InjectiveLinearAttention
from attnlab.mechanisms.l2vit import L2ViTAttention
from attnlab.mechanisms.linear import LinearAttention
from attnlab.mechanisms.lla import LocalLinearAttention
from attnlab.mechanisms.longheads import LongHeadsAttention
from attnlab.mechanisms.mala import MagnitudeAwareLinearAttention
from attnlab.mechanisms.maxvit import MaxViTAttention
from attnlab.mechanisms.medusa import MultiScaleHeadAttention
from attnlab.mechanisms.mil_attention import MILAttentionPooling
from attnlab.mechanisms.moh import MixtureOfHeadAttention
from attnlab.mechanisms.msa_conv import MSAConvAttention
from attnlab.mechanisms.neighborhood import NeighborhoodAttention
from attnlab.mechanisms.rcmha import RelativeConvolutionalAttention
from attnlab.mechanisms.rfa import RandomFeatureAttention
from attnlab.mechanisms.selective import SelectiveAttention
from attnlab.mechanisms.shvit import SingleHeadAttention
from attnlab.mechanisms.sigmoid import SigmoidAttention
from attnlab.mechanisms.soft import SoftAttention
from attnlab.mechanisms.softmax import SoftmaxAttention
from attnlab.mechanisms.softplus import SoftplusAttention
from attnlab.mechanisms.sparsifiner import SparsifinerAttention
from attnlab.mechanisms.spectral import SpectralGating

__all__ = [
    "AgentAttention",
    "CompressedConvolutionalAttention",
    "DynamicMaskAttention",
    "GatedAttention",
    "GaussianAdaptiveAttention",
    "HedgehogAttention",
    "InjectiveLinearAttention",
    "L2ViTAttention",
    "LinearAttention",
    "LocalLinearAttention",
    "LongHeadsAttention",
    "MILAttentionPooling",
    "MSAConvAttention",
    "MagnitudeAwareLinearAttention",
    "MaxViTAttention",
    "MixtureOfHeadAttention",
    "MultiScaleHeadAttention",
    "NeighborhoodAttention",
    "RandomFeatureAttention",
    "RelativeConvolutionalAttention",
    "SelectiveAttention",
    "SigmoidAttention",
    "SingleHeadAttention",
    "SoftAttention",
    "SoftmaxAttention",
    "SoftplusAttention",
    "SparsifinerAttention",
    "SpectralGating",
]
