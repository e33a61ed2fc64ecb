"""In-context regression tasks for ``ICLRegressor``: linear (with ridge, least squares,
debiased gradient descent and averaging baselines) and test-time nonlinear regression."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnlab.models.icl_regressor import ICLRegressor
from attnlab.tasks.base import (
    Evaluation,
    Task,
    check_positive,
    check_split,
    register_task,
    split_generator,
)

Episode = tuple[Tensor, Tensor, Tensor, Tensor]  # x (B, L, d), y (B, L), x_q (B, d), y_q (B,)


class InContextRegression(Task):
    """Shared loop: draw episodes, predict y_q with an ICLRegressor, squared error.

    Slices: test MSE per context length in ``eval_contexts``; baselines: closed-form
    predictors on the same test episodes (constants tuned on the separate "fit" split).
    Validation and test episodes are fixed streams, one per context length, the same for
    every seed and contestant.
    """

    metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    slice_axis: ClassVar[str] = "context length"
    model_defaults: ClassVar[dict[str, Any]] = {"heads": 2}
    eval_size: ClassVar[int] = 2048
    d: int
    context: int
    eval_contexts: tuple[int, ...]

    def draw(self, batch_size: int, context: int, generator: torch.Generator) -> Episode:
        raise NotImplementedError

    def baseline_predictions(self, x: Tensor, y: Tensor, xq: Tensor) -> dict[str, Tensor]:
        """Raw predictions (float64) of each baseline before its tuned scale, if any."""
        raise NotImplementedError

    tuned: ClassVar[tuple[str, ...]] = ()  # baselines whose output is scaled by a fitted step

    def build_model(self, mechanism: str, mechanism_kwargs: dict, **model: Any) -> nn.Module:
        for unused in ("dim", "positions"):
            model.pop(unused, None)
        return ICLRegressor(self.d, mechanism=mechanism, mechanism_kwargs=mechanism_kwargs,
                            **model)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Any:
        return self.draw(batch_size, self.context, generator)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        x, y, xq, yq = batch
        return (model(x, y, xq) - yq).pow(2).mean()

    def fitted_step(self, name: str, context: int) -> float:
        """The least-squares step of baseline ``name`` at ``context``, on the fit split."""
        fit = self.draw(self.eval_size, context, split_generator(0, "fit", context))
        p, t = self.baseline_predictions(*fit[:3])[name], fit[3].double()
        return ((p * t).sum() / p.pow(2).sum().clamp_min(1e-30)).item()

    def baselines(self, context: int, test: Episode) -> dict[str, float]:
        """MSE of every baseline at one context length on the ``test`` episodes.

        A tuned baseline appears twice: ``name`` with its step fitted at this context
        length (an oracle that knows the test length) and ``name_fixed`` with the step
        fitted at the training context, as a trained model's would be.
        """
        raw_test = self.baseline_predictions(*test[:3])
        y = test[3].double()
        out = {}
        for name, pred in raw_test.items():
            if name in self.tuned:
                out[f"{name}_fixed"] = (pred * self.fitted_step(name, self.context) - y) \
                    .pow(2).mean().item()
                pred = pred * self.fitted_step(name, context)
            out[name] = (pred - y).pow(2).mean().item()
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> Evaluation:
        check_split(split)
        slices: dict[str, float] = {}
        baselines: dict[str, dict[str, float]] = {}
        for context in self.eval_contexts:
            # one fixed stream per context length, shared by every run of the sweep
            test = self.draw(self.eval_size, context, split_generator(0, split, context))
            x, y, xq, yq = test
            slices[str(context)] = (model(x, y, xq) - yq).pow(2).mean().item()
            if split == "val":
                continue
            for name, value in self.baselines(context, test).items():
                baselines.setdefault(name, {})[str(context)] = value
        metrics = {"mse": slices[str(self.context)]}
        for c in self.eval_contexts:
            if c != self.context:
                metrics[f"mse_at_{c}"] = slices[str(c)]
        return Evaluation(metrics, slices, baselines)

    def check(self) -> None:
        check_positive(self.name, d=self.d, context=self.context)
        self.eval_contexts = tuple(sorted(set(self.eval_contexts) | {self.context}))
        if min(self.eval_contexts) < 1:
            raise ValueError(f"{self.name}: eval_contexts must be >= 1, got "
                             f"{self.eval_contexts}")


@register_task
@dataclass
class ICLRegression(InContextRegression):
    """x ~ N(0, I_d), beta ~ N(0, I_d / d), y = beta.x + eps, eps ~ N(0, noise): regress y_q
    from L context pairs ("In-Context Linear Regression Demystified").

    Baselines, per context length (X the L x d covariates):
      ridge (Bayes optimal)  beta = (X^T X + noise d I)^-1 X^T y
      least_squares          beta = pinv(X) y (minimum norm when L < d)
      debiased_gd            y_q = eta x_q^T (1/L) sum_i (x_i - mean x) y_i
      averaging              y_q = eta x_q^T (1/L) sum_i x_i y_i (one GD step from 0)
    The two gradient-descent steps eta are fitted by least squares on separate episodes:
    ``debiased_gd`` / ``averaging`` at each context length (an oracle that knows the test
    length), ``debiased_gd_fixed`` / ``averaging_fixed`` once at the training length, as a
    trained layer's step is. A two-head softmax layer with opposite output signs implements the
    debiased step to first order (the mean of y_i cancels), which is the paper's reading.
    """

    d: int = 5
    context: int = 40
    noise: float = 0.1
    eval_contexts: tuple[int, ...] = (10, 20, 40, 80, 160)

    name: ClassVar[str] = "icl_regression"
    description: ClassVar[str] = "in-context linear regression (d=5, L=40), vs ridge and GD"
    tuned: ClassVar[tuple[str, ...]] = ("debiased_gd", "averaging")
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 1500, "batch_size": 256, "lr": 1e-2}

    def __post_init__(self) -> None:
        self.check()
        check_positive(self.name, noise=self.noise)

    def draw(self, batch_size: int, context: int, generator: torch.Generator) -> Episode:
        d = self.d
        x = torch.randn(batch_size, context + 1, d, generator=generator)
        beta = torch.randn(batch_size, d, generator=generator) / math.sqrt(d)
        eps = torch.randn(batch_size, context + 1, generator=generator) * math.sqrt(self.noise)
        y = (x @ beta[..., None]).squeeze(-1) + eps
        return x[:, :-1], y[:, :-1], x[:, -1], y[:, -1]

    def baseline_predictions(self, x: Tensor, y: Tensor, xq: Tensor) -> dict[str, Tensor]:
        x, y, xq = x.double(), y.double(), xq.double()
        gram = x.transpose(1, 2) @ x
        xty = (x.transpose(1, 2) @ y[..., None]).squeeze(-1)
        eye = torch.eye(self.d, dtype=x.dtype)
        ridge = torch.linalg.solve(gram + self.noise * self.d * eye, xty)
        lstsq = (torch.linalg.pinv(x) @ y[..., None]).squeeze(-1)
        length = x.shape[1]
        centred = ((x - x.mean(1, keepdim=True)) * y[..., None]).sum(1) / length
        return {"ridge": (ridge * xq).sum(-1), "least_squares": (lstsq * xq).sum(-1),
                "debiased_gd": (centred * xq).sum(-1), "averaging": (xty / length * xq).sum(-1)}


@register_task
@dataclass
class TestTimeRegression(InContextRegression):
    """Nonlinear in-context regression: y = f(x) + eps with a random smooth f per episode,
    f(x) = sum_j a_j sin(w_j . x + phi_j), x ~ U[-1, 1]^d (test-time regression, the framing
    of "Local Linear Attention": softmax attention is a Nadaraya-Watson estimator, local
    linear attention the local linear one).

    Baselines, per context length: nadaraya_watson and local_linear (Gaussian kernel, the
    best bandwidth of a grid, chosen on separate episodes) and least_squares (one global
    linear fit with intercept).
    """

    d: int = 1
    context: int = 32
    noise: float = 0.01
    frequencies: int = 4
    eval_contexts: tuple[int, ...] = (8, 16, 32, 64)

    name: ClassVar[str] = "test_time_regression"
    description: ClassVar[str] = "in-context nonlinear regression (local linear attention)"
    bandwidths: ClassVar[tuple[float, ...]] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 1000, "batch_size": 128, "lr": 5e-3}

    def __post_init__(self) -> None:
        self.check()
        check_positive(self.name, noise=self.noise, frequencies=self.frequencies)

    def draw(self, batch_size: int, context: int, generator: torch.Generator) -> Episode:
        j, d = self.frequencies, self.d
        x = torch.rand(batch_size, context + 1, d, generator=generator) * 2 - 1
        a = torch.randn(batch_size, j, generator=generator) / math.sqrt(j)
        w = torch.randn(batch_size, j, d, generator=generator) * 2.0
        phi = torch.rand(batch_size, j, generator=generator) * 2 * math.pi
        f = (a[:, None] * torch.sin(x @ w.transpose(1, 2) + phi[:, None])).sum(-1)
        y = f + torch.randn(f.shape, generator=generator) * math.sqrt(self.noise)
        return x[:, :-1], y[:, :-1], x[:, -1], y[:, -1]

    def kernel_predictions(self, x: Tensor, y: Tensor, xq: Tensor, h: float) -> dict[str, Tensor]:
        w = torch.exp(-(x - xq[:, None]).pow(2).sum(-1) / (2 * h * h))  # (B, L)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
        nw = (w * y).sum(-1)
        design = torch.cat([torch.ones_like(x[..., :1]), x - xq[:, None]], dim=-1)
        weighted = design * w[..., None]
        ridge = 1e-6 * torch.eye(self.d + 1, dtype=x.dtype)
        coef = torch.linalg.solve(weighted.transpose(1, 2) @ design + ridge,
                                  (weighted.transpose(1, 2) @ y[..., None]))
        return {"nadaraya_watson": nw, "local_linear": coef[:, 0, 0]}

    def baseline_predictions(self, x: Tensor, y: Tensor, xq: Tensor) -> dict[str, Tensor]:
        x, y, xq = x.double(), y.double(), xq.double()
        out = {f"{name}@{h}": pred for h in self.bandwidths
               for name, pred in self.kernel_predictions(x, y, xq, h).items()}
        design = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)
        coef = (torch.linalg.pinv(design) @ y[..., None]).squeeze(-1)
        out["least_squares"] = coef[:, 0] + (coef[:, 1:] * xq).sum(-1)
        return out

    def baselines(self, context: int, test: Episode) -> dict[str, float]:
        """Kernel baselines keep their best bandwidth on the fit split, scored on test."""
        fit = self.draw(self.eval_size, context, split_generator(0, "fit", context))
        fit_err = {k: (p - fit[3].double()).pow(2).mean().item()
                   for k, p in self.baseline_predictions(*fit[:3]).items()}
        test_pred = self.baseline_predictions(*test[:3])
        out = {"least_squares": (test_pred["least_squares"] - test[3].double()).pow(2)
               .mean().item()}
        for name in ("nadaraya_watson", "local_linear"):
            best = min((k for k in fit_err if k.startswith(name + "@")), key=lambda k: fit_err[k])
            out[name] = (test_pred[best] - test[3].double()).pow(2).mean().item()
        return out
