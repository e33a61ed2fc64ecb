"""Patching on a tiny TransformerLM trained on the arena's induction task (2 layers x 4 heads,
dim 32, vocab 24, length 32, segment 6; trained by patching_train.py to 0.996 accuracy)."""
import time

import torch

from attnlab.heads.metrics import answer_logit, logit_difference
from attnlab.heads.patching import activation_patching, path_patching, path_patching_scores
from attnlab.heads.patching_figures import patching_heatmap
from attnlab.models import TransformerLM

model = TransformerLM(vocab=24, dim=32, depth=2, heads=4)
model.load_state_dict(torch.load("induction.pt"))
model.eval()

# 16 sequences: a segment of 6 distinct tokens at positions 3..8 and again at 19..24, filler
# elsewhere. At position 21 (the segment's 3rd token) the answer is the segment's 4th token.
# The corrupted copy replaces that 4th token in the FIRST occurrence (position 6) by a
# filler token f: an induction head now points at f.
g = torch.Generator().manual_seed(7)
batch, m, length = 16, 6, 32
order = torch.stack([torch.randperm(22, generator=g) + 2 for _ in range(batch)])
seg, rest = order[:, :m], order[:, m:]
clean = rest[:, 1:].gather(1, torch.randint(0, rest.shape[1] - 1, (batch, length), generator=g))
clean[:, 3:9] = seg
clean[:, 19:25] = seg
corrupted = clean.clone()
corrupted[:, 6] = rest[:, 0]
metric = logit_difference(seg[:, 3], rest[:, 0], position=21)
labels = ["."] * length
labels[3:9] = [f"A{i}" for i in range(m)]
labels[19:25] = [f"B{i}" for i in range(m)]
labels[21] = "B2*"

start = time.perf_counter()
heads = activation_patching(model, clean, corrupted, metric)
by_pos = activation_patching(model, clean, corrupted, metric, per_position=True)
keys = activation_patching(model, clean, corrupted, metric, point="k", per_position=True)
resid = activation_patching(model, clean, corrupted, metric, point="resid_pre",
                            per_position=True)
print(f"four sweeps: {time.perf_counter() - start:.2f} s")
print(f"metric: clean {heads.clean:.3f}, corrupted {heads.corrupted:.3f}")


def table(scores, title, k=5):
    print(f"\n{title}\n")
    print("| " + " | ".join(scores.axes) + " | score | share of the gap |")
    print("|" + "---|" * (len(scores.axes) + 2))
    gap = scores.clean - scores.corrupted
    for index, value in scores.top(k):
        cells = [str(i) if a != "position" else f"{i} ({labels[i]})"
                 for a, i in zip(scores.axes, index)]
        print("| " + " | ".join(cells) + f" | {value:+.3f} | {value / gap:+.2f} |")


table(heads, "activation patching, heads (denoise)")
table(by_pos, "activation patching, heads by position (denoise)")
table(keys, "activation patching, k by key position (denoise)", 4)
table(resid, "activation patching, resid_pre by position (denoise)", 4)
induction = heads.top(1)[0][0]
start = time.perf_counter()
to_logits = path_patching_scores(model, clean, corrupted, metric)
to_keys = path_patching_scores(model, clean, corrupted, metric, receivers=[induction],
                               via="k")
to_values = path_patching_scores(model, clean, corrupted, metric, receivers=[induction],
                                 via="v")
print(f"\nthree path sweeps: {time.perf_counter() - start:.2f} s")
table(to_logits, "path patching, each head -> logits (noise)", 4)
table(to_keys, f"path patching, each head -> L{induction[0]}.h{induction[1]} keys (noise)", 4)
table(to_values, f"path patching, each head -> L{induction[0]}.h{induction[1]} values "
      "(noise)", 4)
prev = to_keys.top(1)[0][0]
print("\npath_patching(senders=[%s], receivers=[%s], via='k') = %+.3f" % (
    prev, induction, path_patching(model, clean, corrupted, metric, senders=[prev],
                                   receivers=[induction], via="k")))
print("path_patching(senders=[%s], receivers='logits') = %+.3f" % (
    prev, path_patching(model, clean, corrupted, metric, senders=[prev])))
# second corruption: the token BEFORE the answer in the first occurrence (A2, position 5)
# replaced: the key at position 6 no longer says "after A2"; metric: the answer's logit
second = clean.clone()
second[:, 5] = rest[:, 0]
answer = answer_logit(seg[:, 3], position=21)
keys2 = activation_patching(model, clean, second, answer, point="k", per_position=True)
print(f"\nsecond corruption (A2 replaced): answer logit clean {keys2.clean:.3f}, corrupted "
      f"{keys2.corrupted:.3f}")
table(keys2, "activation patching, k by key position (denoise)", 4)
to_keys2 = path_patching_scores(model, clean, second, answer, receivers=[induction], via="k")
table(to_keys2, f"path patching, each head -> L{induction[0]}.h{induction[1]} keys (noise)",
      4)
out = "."
print(patching_heatmap(heads, f"{out}/patching_heads.png",
                       title="induction model: denoising each head's output"))
print(patching_heatmap(by_pos, f"{out}/patching_heads_by_position.png", tokens=labels,
                       title="induction model: denoising each head's output at one position"))
print(patching_heatmap(to_keys2, f"{out}/patching_path_keys.png",
                       title=f"path patching: each head -> L{induction[0]}.h{induction[1]} "
                             "keys (A2 replaced)"))
