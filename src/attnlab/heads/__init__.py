"""The microscope: read and edit the heads of attnlab models and of Hugging Face models.

Every function works on a model whose attention layers are ``attnlab.Attention`` modules, or
a transformers model prepared with ``attnlab.integrations.hf.use_attnlab`` (which gives its
attention modules the same hook points and ``head_scale``).
"""

from attnlab.heads.ablate import ablate, head_outputs, mean_head_outputs, scale_heads
from attnlab.heads.attribution import (
    EdgeScores,
    attribution_patching,
    edge_attribution_patching,
)
from attnlab.heads.capture import Capture, HeadStats, capture
from attnlab.heads.circuits import RegressionCircuit, circuit_predictions, regression_circuit
from attnlab.heads.guidance import HeadHunt, guided, head_hunter
from attnlab.heads.importance import (
    PruningCurve,
    ablation_scores,
    head_importance,
    pruning_curve,
    rank_correlation,
    real_heads,
)
from attnlab.heads.injection import InjectionFit, fit_injection, inject, task_embedding
from attnlab.heads.lens import LogitAttribution, direct_logit_attribution, head_results, logit_lens
from attnlab.heads.metrics import PatchScores, answer_logit, logit_difference, run_model
from attnlab.heads.patching import (
    HEAD_POINTS,
    RESIDUAL_POINTS,
    activation_patching,
    path_patching,
    path_patching_scores,
)
from attnlab.heads.patching_figures import patching_heatmap
from attnlab.heads.points import (
    ActivationCache,
    CacheFull,
    edit_points,
    hook_points,
    run_with_cache,
)
from attnlab.heads.runs import LoadedRun, load_run
from attnlab.heads.selection import head_divergence, random_heads, segment_attention, top_heads
from attnlab.heads.sinks import MassiveActivations, massive_activations, sink_heads, sink_scores
from attnlab.heads.sites import POINTS, Site, sites
from attnlab.heads.spatial import HeadClusters, cluster_heads, grid_positions, offset_patterns
from attnlab.heads.steer import edit_weights, redistribute, shift_toward, toward_identity
from attnlab.heads.viewer import PageRender, attention_page, render_page

__all__ = ["POINTS", "Capture", "HeadClusters", "HeadHunt", "HeadStats", "LoadedRun",
           "MassiveActivations", "PruningCurve", "Site", "ablate", "ablation_scores", "capture",
           "cluster_heads", "edit_weights", "grid_positions", "guided", "head_hunter",
           "head_importance", "head_outputs", "load_run", "massive_activations",
           "mean_head_outputs", "offset_patterns", "pruning_curve", "rank_correlation",
           "real_heads",
           "redistribute", "shift_toward", "sink_heads", "sink_scores", "sites",
           "toward_identity", "RegressionCircuit", "circuit_predictions", "head_divergence",
           "random_heads", "regression_circuit", "scale_heads", "segment_attention",
           "top_heads", "InjectionFit", "fit_injection", "inject", "task_embedding",
           # the patching workflow: hook points, caches, patching, attribution, lens, viewer
           "ActivationCache", "CacheFull", "edit_points", "hook_points", "run_with_cache",
           "HEAD_POINTS", "RESIDUAL_POINTS", "PatchScores", "activation_patching",
           "path_patching", "path_patching_scores", "patching_heatmap", "answer_logit",
           "logit_difference", "run_model", "EdgeScores", "attribution_patching",
           "edge_attribution_patching", "LogitAttribution", "direct_logit_attribution",
           "head_results", "logit_lens", "PageRender", "attention_page", "render_page"]
