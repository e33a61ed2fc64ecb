"""AtP, AtP with integrated gradients, EAP and EAP-IG against real patching on a 2-layer
softmax TransformerLM trained on the arena's induction task.

Usage, from the repository root::

    python docs/results/heads-attribution/attribution_study.py ao|mlp [--steps 16]
        [--weights /tmp/attr] [--mlp-nodes]

``ao``: attention only (``mlp_ratio=0``); ``mlp``: with MLPs. Trains the model (1,200 steps,
batch 64, AdamW lr 3e-3 with 100 warm-up steps and a cosine decay, seed 0, one thread) unless
``<weights>/induction[_attn_only].pt`` exists, then prints Spearman and top-k overlaps of AtP
(and AtP-IG) against ``activation_patching`` and of EAP (and EAP-IG) against direct edge
patching (written below, independently of ``heads.attribution``) and
``heads.patching.path_patching``. ``--mlp-nodes`` (the ``mlp`` model): only EAP and EAP-IG
with MLP nodes (``edge_attribution_patching(..., mlps=True)``) against direct edge patching
of every edge, the MLP senders and receivers included.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.heads import attribution as at
from attnlab.heads.metrics import Metric, PatchScores, logit_difference
from attnlab.heads.patching import activation_patching, path_patching
from attnlab.tasks import make_task


# ---------------------------------------------------------- direct edge patching by hand
def _caches(model: Any, x: Tensor) -> tuple[dict[Any, Tensor], dict[int, Tensor]]:
    """The residual entering each block (key i), what each attention and each MLP adds
    (keys ("attn", i), ("mlp", i)) and each layer's hook_heads value (TransformerLM)."""
    resid: dict[Any, Tensor] = {}
    heads: dict[int, Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, i=i: resid.__setitem__(i, a[0].detach())))
        handles.append(block.attn.register_forward_hook(
            lambda m, a, out, i=i: resid.__setitem__(("attn", i), out.detach())))
        if block.mlp is not None:
            handles.append(block.mlp.register_forward_hook(
                lambda m, a, out, i=i: resid.__setitem__(("mlp", i), out.detach())))
        handles.append(block.attn.hook_heads.register_forward_hook(
            lambda m, a, out, i=i: heads.__setitem__(i, out.detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return resid, heads


def _edge_patched(model: Any, base: Tensor, caches: tuple, metric: Metric,
                  upstream: Any, downstream: Any) -> Tensor:
    """The metric of the base run where only ``downstream``'s input (one head's q, k or v,
    one MLP (``("mlp", l)``), or the residual the final norm reads) sees out_u(target) -
    out_u(base) added to the residual it reads; everything else runs as in the base run.
    ``upstream``: "embed", (layer, head) or ("mlp", layer)."""
    (base_resid, base_heads), (target_resid, target_heads) = caches
    if upstream == "embed":
        delta = target_resid[0] - base_resid[0]
    elif upstream[0] == "mlp":
        delta = target_resid[upstream] - base_resid[upstream]
    else:
        layer, head = upstream
        dz = torch.zeros_like(base_heads[layer])
        dz[:, :, head] = target_heads[layer][:, :, head] - base_heads[layer][:, :, head]
        delta = dz.flatten(2) @ model.blocks[layer].attn.o_proj.weight.T
    if downstream == "logits":
        handle = model.norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,))
    elif downstream[0] == "mlp":
        block = model.blocks[downstream[1]]
        mid = base_resid[downstream[1]] + base_resid["attn", downstream[1]]
        fed = block.mlp(block.norm2(mid + delta))
        handle = block.mlp.register_forward_hook(lambda m, a, out: fed)
    else:
        layer, head, point = downstream
        block = model.blocks[layer]
        seen: dict[str, Tensor] = {}
        probe = getattr(block.attn, f"hook_{point}")
        grab = probe.register_forward_hook(lambda m, a, out: seen.update(v=out))
        try:
            block.attn(block.norm1(base_resid[layer] + delta))
        finally:
            grab.remove()
        new = seen["v"]

        def replace(m: nn.Module, a: Any, out: Tensor) -> Tensor:
            keep = torch.zeros_like(out)
            keep[:, head] = 1
            return out + keep * (new - out)
        handle = probe.register_forward_hook(replace)
    try:
        return metric(model(base))
    finally:
        handle.remove()


def edges_by_hand(model: Any, clean: Tensor, corrupted: Tensor, metric: Metric,
                  edges: list, direction: str = "noise") -> Tensor:
    """Real direct edge patching of each (upstream, downstream) edge."""
    base, target = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    caches = (_caches(model, base), _caches(model, target))
    with torch.no_grad():
        unpatched = metric(model(base))
        return torch.stack([_edge_patched(model, base, caches, metric, u, v) - unpatched
                            for u, v in edges])


# ------------------------------------------------------------------------------ model
def trained(which: str, folder: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    task = make_task("induction")
    extra = {} if which == "mlp" else {"mlp_ratio": 0}
    model = task.build_model("softmax", {}, dim=64, depth=2, heads=4, **extra)
    weights = os.path.join(folder, f"induction{'' if which == 'mlp' else '_attn_only'}.pt")
    if os.path.exists(weights):
        model.load_state_dict(torch.load(weights))
    else:
        torch.set_num_threads(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        steps = 1200
        for step in range(steps):
            lr = 3e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(step / steps * math.pi))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = task.loss(model, task.train_batch(64, gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
        os.makedirs(folder, exist_ok=True)
        torch.save(model.state_dict(), weights)
    return model.eval(), task


def pair(batch: int = 32) -> tuple[Tensor, Tensor, Metric, int]:
    """clean: filler, an 8-token segment at 3..10, filler, the segment again from 24 up to its
    5th token (position 28), whose answer is the segment's 6th token B; corrupted: B replaced
    at its first occurrence (position 8) by a filler token C; metric logit(B) - logit(C) at
    the last position. Returns (clean, corrupted, metric, first corrupted position)."""
    g = torch.Generator().manual_seed(1)
    m, first, second, j = 8, 3, 24, 4
    order = torch.rand(batch, 62, generator=g).argsort(-1) + 2
    seg, rest = order[:, :m], order[:, m:]
    clean = rest.gather(1, torch.randint(0, rest.shape[1], (batch, second + j + 1),
                                         generator=g))
    clean[:, first:first + m] = seg
    clean[:, second:second + j + 1] = seg[:, :j + 1]
    answer, other = seg[:, j + 1], rest[:, -1]
    corrupted = clean.clone()
    corrupted[:, first + j + 1] = other
    return clean, corrupted, logit_difference(answer, other), first + j + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=("ao", "mlp"))
    parser.add_argument("--steps", type=int, default=16, help="integrated-gradients points")
    parser.add_argument("--weights", default="/tmp/attr")
    parser.add_argument("--mlp-nodes", action="store_true",
                        help="only EAP / EAP-IG with MLP nodes (the mlp model)")
    args = parser.parse_args()
    if args.mlp_nodes and args.which != "mlp":
        parser.error("--mlp-nodes needs the model with MLPs: mlp")
    model, task = trained(args.which, args.weights)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: TransformerLM dim 64, 2 layers x 4 heads, "
          f"{'with MLPs' if args.which == 'mlp' else 'attention only'}; test accuracy "
          f"{task.evaluate(model).metrics['accuracy']:.3f}")
    clean, corrupted, metric, reach_from = pair()
    with torch.no_grad():
        print(f"metric clean {float(metric(model(clean))):.3f}, corrupted "
              f"{float(metric(model(corrupted))):.3f}")
    m = args.steps
    if args.mlp_nodes:
        mlp_nodes(model, clean, corrupted, metric, m)
        return

    def show(name: str, est: PatchScores | Tensor, ref: PatchScores | Tensor, k: int) -> None:
        a = at.agreement(est, ref, k=k)
        print(f"{name:<40} Spearman {a.spearman:+.3f}  top-{a.k} overlap "
              f"{a.top_k_overlap:.2f}  ({a.entries} entries)")

    for direction in ("denoise", "noise"):
        for point in ("heads", "q", "k", "v"):
            for per_position in (False, True):
                ref = activation_patching(model, clean, corrupted, metric, point=point,
                                          per_position=per_position, direction=direction)
                k = 10 if per_position else 3
                label = f"{direction} {point}{' x position' if per_position else ''}"
                for steps in (1, m):
                    t0 = time.perf_counter()
                    est = at.attribution_patching(model, clean, corrupted, metric,
                                                  point=point, per_position=per_position,
                                                  direction=direction, steps=steps)
                    took = time.perf_counter() - t0
                    show(f"{'AtP' if steps == 1 else f'AtP-IG{m}'} {label}", est, ref, k)
                    if point == "heads" and not per_position:
                        print(f"    ({took:.2f} s) scores:",
                              [[round(float(x), 2) for x in row] for row in est.scores])
                if point == "heads" and not per_position:
                    print("    patching scores:",
                          [[round(float(x), 2) for x in row] for row in ref.scores])
        for point in ("resid_pre", "attn_out", "resid_post"):
            ref = activation_patching(model, clean, corrupted, metric, point=point,
                                      per_position=True, direction=direction)
            for steps in (1, m):
                est = at.attribution_patching(model, clean, corrupted, metric, point=point,
                                              per_position=True, direction=direction,
                                              steps=steps)
                name = "AtP" if steps == 1 else f"AtP-IG{m}"
                show(f"{name} {direction} {point} x position", est, ref, 5)

    results = {}
    for steps in (1, m):
        t0 = time.perf_counter()
        results[steps] = at.edge_attribution_patching(model, clean, corrupted, metric,
                                                      steps=steps)
        name = "EAP" if steps == 1 else f"EAP-IG{m}"
        print(f"{name} (noise): {time.perf_counter() - t0:.2f} s; top edges:",
              ", ".join(f"{u} -> {v} {s:+.2f}" for u, v, s in results[steps].top(5)))
    edges = results[1]
    pairs = [(u, v) for ui, u in enumerate(edges.upstream)
             for vi, v in enumerate(edges.downstream) if edges.valid[ui, vi]]

    def up(u: str) -> Any:
        return "embed" if u == "embed" else (int(u[1]), int(u.split(".H")[1]))

    def down(v: str) -> Any:
        if v == "logits":
            return "logits"
        layer, head, p = v.split(".")
        return (int(layer[1:]), int(head[1:]), p)

    t0 = time.perf_counter()
    real = edges_by_hand(model, clean, corrupted, metric, [(up(u), down(v)) for u, v in pairs])
    print(f"direct edge patching by hand: {len(pairs)} edges, {time.perf_counter() - t0:.2f} s")
    heads_only = [(i, (u, v)) for i, (u, v) in enumerate(pairs) if u != "embed"]
    path = []
    for _, (u, v) in heads_only:
        layer, head = up(u)
        if v == "logits":
            path.append(path_patching(model, clean, corrupted, metric, senders=[(layer, head)]))
        else:
            rl, rh, p = down(v)
            path.append(path_patching(model, clean, corrupted, metric, senders=[(layer, head)],
                                      receivers=[(rl, rh)], via=p))
    index = torch.tensor([i for i, _ in heads_only])
    for steps, found in results.items():
        edge_est = torch.tensor([found.score(u, v) for u, v in pairs])
        name = "EAP" if steps == 1 else f"EAP-IG{m}"
        show(f"{name} vs direct edge patching", edge_est, real, 10)
        show(f"{name} vs path_patching (head senders)", edge_est[index], torch.tensor(path),
             10)
    show("direct edge patching vs path_patching", real[index], torch.tensor(path), 10)
    print(f"reach: the corruption is at position {reach_from}")


def _node(name: str) -> Any:
    """An EdgeScores name as the tuples edges_by_hand takes."""
    if name in ("embed", "logits"):
        return name
    parts = name.split(".")
    layer = int(parts[0][1:])
    if parts[1] == "MLP":
        return ("mlp", layer)
    head = int(parts[1][1:])
    return (layer, head) if len(parts) == 2 else (layer, head, parts[2])


def mlp_nodes(model: nn.Module, clean: Tensor, corrupted: Tensor, metric: Metric,
              m: int) -> None:
    """EAP and EAP-IG with MLP nodes against direct edge patching of every edge (and of the
    edges of the graph without MLP nodes alone)."""
    results = {}
    for steps in (1, m):
        t0 = time.perf_counter()
        results[steps] = at.edge_attribution_patching(model, clean, corrupted, metric,
                                                      steps=steps, mlps=True)
        name = "EAP" if steps == 1 else f"EAP-IG{m}"
        print(f"{name} with MLP nodes (noise): {time.perf_counter() - t0:.2f} s; top edges:",
              ", ".join(f"{u} -> {v} {s:+.2f}" for u, v, s in results[steps].top(5)))
    edges = results[1]
    pairs = [(u, v) for ui, u in enumerate(edges.upstream)
             for vi, v in enumerate(edges.downstream) if edges.valid[ui, vi]]
    t0 = time.perf_counter()
    real = edges_by_hand(model, clean, corrupted, metric,
                         [(_node(u), _node(v)) for u, v in pairs])
    print(f"direct edge patching by hand: {len(pairs)} edges, {time.perf_counter() - t0:.2f} s")
    old = torch.tensor([i for i, (u, v) in enumerate(pairs)
                        if "MLP" not in u and "MLP" not in v])
    new = torch.tensor([i for i, (u, v) in enumerate(pairs) if "MLP" in u or "MLP" in v])
    for steps, found in results.items():
        est = torch.tensor([found.score(u, v) for u, v in pairs])
        name = "EAP" if steps == 1 else f"EAP-IG{m}"
        for label, index in (("all", torch.arange(len(pairs))), ("MLP", new), ("head", old)):
            a = at.agreement(est[index], real[index], k=10)
            print(f"{name} vs direct edge patching, {label} edges ({a.entries}): Spearman "
                  f"{a.spearman:+.3f}  top-{a.k} overlap {a.top_k_overlap:.2f}")
    order = real.abs().argsort(descending=True)[:5]
    print("largest direct edge patches:", ", ".join(
        f"{pairs[int(i)][0]} -> {pairs[int(i)][1]} {float(real[i]):+.2f} (EAP "
        f"{results[1].score(*pairs[int(i)]):+.2f}, EAP-IG{m} "
        f"{results[m].score(*pairs[int(i)]):+.2f})" for i in order))


if __name__ == "__main__":
    main()
