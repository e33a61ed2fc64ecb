"""An attention-pattern viewer: one self-contained HTML page per capture.

``attention_page(cap, tokens, "page.html")`` writes a page that needs nothing but a browser
(no network: the script, the style and the data are inline): a layer selector, a grid of the
layer's heads (each head's Lq x Lk pattern drawn on a canvas), a click on a head enlarges it,
hovering a cell shows the query token, the key token and the weight, and hovering a token
colours the tokens it attends to in the chosen head.

The weights are stored as one byte per cell (256 levels over the page's range, 0..1 for
probabilities; base64 in an embedded JSON block): about 1.36 bytes per cell, so 4 layers x 8
heads x 128 tokens (524,288 cells) make a page of 713,622 bytes. Pages above ``max_cells``
(default 2**22 cells, about 5.6 MB) are refused with a message saying how to make them
smaller (``layers=``, ``heads=``, fewer tokens, or a larger ``max_cells``).

``render_page`` opens a page in a headless Chromium (``apt-get install chromium``): a
screenshot, the console's messages and the result of the page's self-test
(``?selftest=1``: synthetic clicks and hovers whose effect the page checks itself).
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab.heads.capture import Capture

__all__ = ["MAX_CELLS", "PageRender", "attention_page", "find_browser", "page_data",
           "render_page"]

MAX_CELLS = 2 ** 22  # weights on one page: about 5.6 MB of HTML
LEVELS = 255  # one byte per weight
_WEIGHTS_NAME = re.compile(r"^L(\d+)\.weights$")

Weights = Capture | Tensor | Mapping[Any, Tensor] | Sequence[Tensor]


def _layer_maps(weights: Weights) -> dict[int, Tensor]:
    """{layer: (B, H, Lq, Lk)} from a Capture (its ``L<j>.weights`` records), one tensor
    ((B, H, Lq, Lk) or (H, Lq, Lk): layer 0), a mapping {layer or "L<j>.weights": tensor} or a
    sequence of tensors (layer = position)."""
    if isinstance(weights, Capture):
        found = {int(m.group(1)): weights[name] for name in weights.records
                 if (m := _WEIGHTS_NAME.match(name)) and weights.records[name]}
        if not found:
            names = ", ".join(weights.records) or "nothing"
            raise ValueError(f"the capture holds no attention weights (it holds {names}): "
                             "capture the L<layer>.weights points, e.g. "
                             "capture(model, ['L0.weights', 'L1.weights'])")
        maps: dict[int, Tensor] = found
    elif isinstance(weights, Tensor):
        maps = {0: weights}
    elif isinstance(weights, Mapping):
        maps = {}
        for key, value in weights.items():
            if isinstance(key, str):
                m = re.match(r"^L(\d+)(\.weights)?$", key)
                if m is None:
                    raise ValueError(f"layer key {key!r}: use an int or 'L<layer>.weights'")
                maps[int(m.group(1))] = value
            else:
                maps[int(key)] = value
    elif isinstance(weights, Sequence):
        maps = dict(enumerate(weights))
    else:
        raise TypeError(f"weights must be a Capture, a tensor, a mapping or a sequence of "
                        f"tensors, got {type(weights).__name__}")
    out = {}
    for layer, w in sorted(maps.items()):
        if not isinstance(w, Tensor):
            raise TypeError(f"layer {layer}: expected a tensor, got {type(w).__name__}")
        if w.dim() == 3:
            w = w[None]
        if w.dim() != 4:
            raise ValueError(f"layer {layer}: attention weights must be (B, H, Lq, Lk) or "
                             f"(H, Lq, Lk), got shape {tuple(w.shape)}")
        out[layer] = w.detach().float().cpu()
    return out


def _as_mask(mask: Tensor | Sequence[bool] | Sequence[int], item: int, length: int) -> Tensor:
    """The (L,) boolean key mask of sequence ``item``, aligned to the last ``length`` keys."""
    m = torch.as_tensor(mask)
    if m.dim() == 2:
        if not 0 <= item < m.shape[0]:
            raise ValueError(f"item {item} out of range: key_mask holds {m.shape[0]} sequences")
        m = m[item]
    if m.dim() != 1:
        raise ValueError(f"key_mask must be (L,) or (B, L), got shape {tuple(m.shape)}")
    if m.shape[0] < length:
        raise ValueError(f"key_mask has {m.shape[0]} positions, the weights {length} keys")
    return m[-length:].bool()


def _heads_of(layer: int, count: int, heads: Sequence[int] | Mapping[int, Sequence[int]] | None
              ) -> list[int]:
    chosen = (range(count) if heads is None else
              heads.get(layer, range(count)) if isinstance(heads, Mapping) else heads)
    out = [int(h) for h in chosen]
    for h in out:
        if not 0 <= h < count:
            raise ValueError(f"head {h} out of range in layer {layer}, which has {count} heads "
                             f"(0..{count - 1})")
    if not out:
        raise ValueError(f"no heads chosen in layer {layer}")
    return out


def _encode(maps: Tensor, lo: float, hi: float) -> list[str]:
    """(H, Lq, Lk) -> one base64 string of Lq*Lk bytes per head (level = round((w - lo) /
    (hi - lo) * 255))."""
    q = ((maps - lo) / (hi - lo) * LEVELS).round().clamp(0, LEVELS).to(torch.uint8)
    return [base64.b64encode(head.contiguous().numpy().tobytes()).decode("ascii")
            for head in q]


def page_data(weights: Weights, tokens: Sequence[str], *,
              layers: Sequence[int] | None = None,
              heads: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
              title: str | None = None, item: int = 0,
              key_mask: Tensor | Sequence[bool] | Sequence[int] | None = None,
              query_tokens: Sequence[str] | None = None,
              max_cells: int = MAX_CELLS) -> dict[str, Any]:
    """The JSON-ready content of the page ``attention_page`` writes (see there): ``title``,
    ``queries`` and ``keys`` (token strings), ``lo`` and ``hi`` (the weight of levels 0 and
    255), ``layers`` (each ``{"layer", "heads", "maps"}``, ``maps`` one base64 string of
    Lq x Lk bytes per head, row-major) and ``cells``."""
    maps = _layer_maps(weights)
    if layers is None:
        layers = sorted(heads) if isinstance(heads, Mapping) else sorted(maps)
    chosen = [int(j) for j in layers]
    for j in chosen:
        if j not in maps:
            raise ValueError(f"layer {j} has no weights here (layers with weights: "
                             f"{', '.join(map(str, sorted(maps)))})")
    if not chosen:
        raise ValueError("no layers chosen")
    raw = {j: tuple(maps[j].shape[-2:]) for j in chosen}
    if len(set(raw.values())) > 1:
        listing = ", ".join(f"L{j} {q} x {k}" for j, (q, k) in raw.items())
        raise ValueError(f"one page shows layers of one shape, and these differ (queries x "
                         f"keys: {listing}): choose layers of one shape with layers= (e.g. an "
                         "encoder-decoder's self- and cross-attention on separate pages)")
    keys_all = [str(t) for t in tokens]
    picked: dict[int, Tensor] = {}
    keys: list[str] = []
    queries: list[str] = []
    for j in chosen:
        w = maps[j]
        b, h, lq, lk = w.shape
        if not 0 <= item < b:
            raise ValueError(f"item {item} out of range: layer {j} holds {b} sequences")
        w = w[item][_heads_of(j, h, heads)]  # (h', Lq, Lk)
        key_real = torch.ones(lk, dtype=torch.bool) if key_mask is None else \
            _as_mask(key_mask, item, lk)
        if query_tokens is None:  # self-attention: queries are the last Lq keys
            if lq > lk:
                raise ValueError(f"layer {j} has more queries ({lq}) than keys ({lk}): for "
                                 "cross-attention pass query_tokens= (and choose those layers "
                                 "with layers=)")
            query_real = key_real[lk - lq:]
        else:
            query_real = torch.ones(lq, dtype=torch.bool)
        w = w[:, query_real][:, :, key_real]
        n_keys = int(key_real.sum())
        if len(keys_all) == lk:
            layer_keys = [t for t, r in zip(keys_all, key_real.tolist(), strict=True) if r]
        elif len(keys_all) == n_keys:
            layer_keys = keys_all
        else:
            extra = f" ({n_keys} of them real)" if n_keys != lk else ""
            raise ValueError(f"layer {j} has {lk} keys{extra} but {len(keys_all)} tokens were "
                             "given: pass one token per key (or per real key)")
        if query_tokens is None:
            layer_queries = layer_keys[len(layer_keys) - int(query_real.sum()):]
        else:
            layer_queries = [str(t) for t in query_tokens]
            if len(layer_queries) != lq:
                raise ValueError(f"layer {j} has {lq} queries but {len(layer_queries)} "
                                 "query_tokens were given")
        keys, queries = layer_keys, layer_queries  # the same for every layer (one shape)
        if not torch.isfinite(w).all():
            raise ValueError(f"layer {j} has non-finite weights (NaN or inf) at real "
                             "positions; padding rows often hold them: pass key_mask= (the "
                             "attention mask) to leave padding out")
        picked[j] = w
    cells = sum(w.numel() for w in picked.values())
    if cells > max_cells:
        raise ValueError(f"the page would hold {cells:,} weights (about "
                         f"{cells * 4 / 3 / 1e6:.1f} MB), more than max_cells={max_cells:,}: "
                         "choose fewer layers= or heads=, fewer tokens, or raise max_cells")
    lo = min(0.0, min(float(w.min()) for w in picked.values()))
    hi = max(float(w.max()) for w in picked.values())
    hi = max(hi, 1.0) if lo == 0.0 and hi <= 1.0 else hi  # probabilities: 1 = full colour
    if hi <= lo:
        hi = lo + 1.0
    head_lists = {j: _heads_of(j, maps[j].shape[1], heads) for j in chosen}
    return {
        "title": title or "attention patterns",
        "queries": queries,
        "keys": keys,
        "lo": lo,
        "hi": hi,
        "cells": cells,
        "layers": [{"layer": j, "heads": head_lists[j], "maps": _encode(w, lo, hi)}
                   for j, w in picked.items()],
    }


def _script_json(data: dict[str, Any]) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' (escaped as \\u003c ...), so
    no token can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def attention_page(weights: Weights, tokens: Sequence[str], path: str | Path, *,
                   layers: Sequence[int] | None = None,
                   heads: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
                   title: str | None = None, item: int = 0,
                   key_mask: Tensor | Sequence[bool] | Sequence[int] | None = None,
                   query_tokens: Sequence[str] | None = None,
                   max_cells: int = MAX_CELLS) -> Path:
    """Write one self-contained HTML page of attention patterns to ``path`` and return it.

    ``weights``: a ``Capture`` holding ``L<j>.weights`` points (attnlab or Hugging Face
    models), one (B, H, Lq, Lk) or (H, Lq, Lk) tensor, a mapping {layer: tensor} or a list of
    tensors; layers may have different head counts. ``tokens``: one string per key (the
    padded sequence, or its real tokens only when ``key_mask`` is given). ``item``: which
    sequence of the batch. ``key_mask`` (L,) or (B, L), True (1) for real tokens: padding
    keys and queries are left out. Queries are the last Lq tokens (a decoding step with a
    cache has Lq < Lk); for cross-attention pass ``query_tokens`` and choose those layers.
    ``layers`` and ``heads`` (a list for every layer, or {layer: heads}, whose layers are then
    the default ``layers``) choose what is shown;
    head labels are indices into the tensors as given (a capture made with ``heads=`` holds
    only those heads, numbered from 0). One page holds layers of one query x key shape, and
    at most ``max_cells`` weights (ValueError beyond, saying what to reduce).
    Weights are stored to 1/255 of the page's range (0..1 for probabilities)."""
    data = page_data(weights, tokens, layers=layers, heads=heads, title=title, item=item,
                     key_mask=key_mask, query_tokens=query_tokens, max_cells=max_cells)
    fill = {"__TITLE__": html.escape(data["title"]), "__DATA__": _script_json(data)}
    page = re.sub("__TITLE__|__DATA__", lambda m: fill[m.group(0)], _TEMPLATE)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# --- checking a page in a headless browser -------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_CONSOLE = re.compile(r":CONSOLE[^\]]*\]\s*(.*)$")


def _console_message(text: str) -> str:
    """Chromium's ``"message", source: url (line)`` as ``message (url line)``."""
    m = re.fullmatch(r'"(.*)", source: (.*?) \((\d+)\)', text.strip(), re.S)
    return f"{m.group(1)} ({m.group(2)} line {m.group(3)})" if m else text.strip()


def find_browser() -> str | None:
    """The path of a Chromium-family browser on PATH, or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageRender:
    """What a headless browser made of a page: the screenshot (PNG path), the DOM after the
    scripts ran, the console's messages (uncaught exceptions included), the errors the page
    caught itself and its self-test result (None when it did not run)."""

    png: Path
    dom: str
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    selftest: dict[str, Any] | None = None
    returncode: int = 0
    log: str = ""  # the end of Chromium's stderr, for when it failed

    def map_fraction(self) -> float:
        """The share of the maps' pixels in the screenshot that are tinted (blue - red >= 3:
        a weight above about 3% of the page's range; white is 0 or nothing drawn). The maps
        are the canvases the self-test located; without it, the whole screenshot (text,
        borders, the tooltip and the background are grey, white or orange)."""
        from PIL import Image

        with Image.open(self.png) as image:
            rgb = torch.frombuffer(bytearray(image.convert("RGB").tobytes()),
                                   dtype=torch.uint8).view(image.height, image.width, 3).int()
        tinted = (rgb[..., 2] - rgb[..., 0]) >= 3
        boxes = (self.selftest or {}).get("canvases") or []
        if not boxes:
            return float(tinted.float().mean())
        inside = torch.zeros_like(tinted)
        for x, y, w, h in boxes:  # a 1 px border is grey: inset it
            inside[max(y + 1, 0):max(y + h - 1, 0), max(x + 1, 0):max(x + w - 1, 0)] = True
        if not inside.any():
            return 0.0
        return float(tinted[inside].float().mean())

    def problems(self, min_map: float = 0.05) -> list[str]:
        """Everything wrong with the render: console messages (the page logs nothing when all
        is well), errors it caught, a failed or missing self-test, a blank screenshot."""
        out = [f"Chromium exited with {self.returncode}: {self.log}"] if self.returncode else []
        out += [f"console: {line}" for line in self.console]
        out += [f"page error: {e}" for e in self.page_errors]
        if self.selftest is None:
            out.append("the self-test did not run (no result in the DOM)")
        elif not self.selftest.get("ok"):
            failed = [k for k, v in self.selftest.get("checks", {}).items() if not v]
            out.append(f"self-test failed: {', '.join(failed) or self.selftest}")
        if not self.png.exists() or self.png.stat().st_size == 0:
            out.append("no screenshot was written")
        else:
            share = self.map_fraction()
            if share < min_map:
                out.append(f"blank render: {share:.2%} of the maps' pixels are tinted "
                           f"(< {min_map:.0%}): the maps were not drawn")
        return out


def render_page(page: str | Path, png: str | Path, *, selftest: bool = True,
                size: tuple[int, int] = (1200, 900), browser: str | None = None,
                timeout: float = 60.0) -> PageRender:
    """Open ``page`` in headless Chromium (``browser`` or the first on PATH) once: a
    screenshot of ``size`` to ``png``, the DOM after the scripts ran, and the console's lines
    (``--enable-logging=stderr``). ``selftest``: open it with ``?selftest=1``. Runs with
    ``--no-sandbox`` (Chromium does not start as root without it, as in containers and CI)
    and a throwaway profile."""
    exe = browser or find_browser()
    if exe is None:
        raise FileNotFoundError("no Chromium on PATH: install it (Debian/Ubuntu: apt-get "
                                "install -y chromium)")
    url = Path(page).resolve().as_uri() + ("?selftest=1" if selftest else "")
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="attnlab-viewer-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-extensions", "--enable-logging=stderr", "--v=0",
               f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               "--hide-scrollbars", f"--screenshot={png}", "--dump-dom", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    console = [_console_message(m.group(1)) for line in done.stderr.splitlines()
               if (m := _CONSOLE.search(line))]
    dom = done.stdout
    result = None
    m = re.search(r'<pre id="selftest"[^>]*>(.*?)</pre>', dom, re.S)
    if m and m.group(1).strip():
        result = json.loads(html.unescape(m.group(1)))
    errors_m = re.search(r'<ul id="errors"[^>]*>(.*?)</ul>', dom, re.S)
    page_errors = [html.unescape(e) for e in
                   re.findall(r"<li>(.*?)</li>", errors_m.group(1), re.S)] if errors_m else []
    return PageRender(png, dom, console, page_errors, result, done.returncode,
                      "\n".join(done.stderr.strip().splitlines()[-5:]))


_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<script>
// caught before the viewer runs: any error is shown on the page (and read by tests)
window.viewerErrors = [];
function viewerError(message) {
  window.viewerErrors.push(String(message));
  var list = document.getElementById("errors");
  if (!list) return;
  var li = document.createElement("li");
  li.textContent = String(message);
  list.appendChild(li);
  list.hidden = false;
}
window.addEventListener("error", function (e) { viewerError(e.message); });
window.addEventListener("unhandledrejection", function (e) { viewerError(e.reason); });
</script>
<style>
body { font: 13px/1.35 system-ui, sans-serif; margin: 0; color: #222; background: #fff; }
header { display: flex; gap: 18px; align-items: baseline; padding: 8px 14px;
         border-bottom: 1px solid #ddd; flex-wrap: wrap; }
h1 { font-size: 16px; margin: 0; }
h2 { font-size: 14px; margin: 0 0 6px 0; }
#info { color: #666; }
#errors { color: #a00; background: #fee; margin: 0; padding: 6px 30px; }
main { display: flex; gap: 18px; padding: 12px 14px; align-items: flex-start; }
#grid { display: flex; flex-wrap: wrap; gap: 8px; max-width: 560px; }
figure { margin: 0; padding: 3px; border: 2px solid transparent; cursor: pointer; }
figure.selected { border-color: #d62; }
figcaption { text-align: center; color: #555; font-size: 11px; }
canvas.map { display: block; image-rendering: pixelated; border: 1px solid #ccc; }
#scale { vertical-align: middle; border: 1px solid #ccc; }
#legend { color: #666; }
#detail { flex: 1; min-width: 300px; }
.strip { display: flex; flex-wrap: wrap; gap: 2px; margin-top: 8px; max-width: 560px; }
.strip span { white-space: pre; padding: 1px 3px; border: 1px solid #eee; border-radius: 3px;
              cursor: default; font-family: ui-monospace, monospace; font-size: 12px; }
.strip span.focus { outline: 2px solid #d62; }
.label { color: #666; margin-top: 8px; }
#tip { position: fixed; pointer-events: none; background: #222; color: #fff;
       padding: 3px 7px; border-radius: 4px; font-size: 12px; white-space: pre;
       font-family: ui-monospace, monospace; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <label>layer <select id="layer"></select></label>
  <label>colour <select id="gamma">
    <option value="0.5">sqrt</option><option value="1">linear</option>
    <option value="0.25">fourth root</option></select></label>
  <span id="legend"><span id="lo"></span> <canvas id="scale" width="120" height="10"></canvas>
    <span id="hi"></span></span>
  <span id="info"></span>
</header>
<ul id="errors" hidden></ul>
<main>
  <section id="grid"></section>
  <section id="detail">
    <h2 id="detail-title"></h2>
    <canvas id="big" class="map"></canvas>
    <div class="label" id="query-label">queries (hover one: the keys it attends to)</div>
    <div class="strip" id="queries"></div>
    <div class="label" id="key-label" hidden>keys</div>
    <div class="strip" id="keys" hidden></div>
  </section>
</main>
<div id="tip" hidden></div>
<pre id="selftest" hidden></pre>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
var DATA = JSON.parse(document.getElementById("data").textContent);
var LQ = DATA.queries.length, LK = DATA.keys.length;
var SELF = JSON.stringify(DATA.queries) === JSON.stringify(DATA.keys);
var state = { layer: 0, head: 0, gamma: 0.5 };
var bytesCache = {};

function bytes(li, hi) {
  var key = li + ":" + hi;
  if (!bytesCache[key]) {
    var raw = atob(DATA.layers[li].maps[hi]);
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    bytesCache[key] = out;
  }
  return bytesCache[key];
}
function weight(li, hi, q, k) {
  return DATA.lo + bytes(li, hi)[q * LK + k] / 255 * (DATA.hi - DATA.lo);
}
function fmt(w) { return w.toFixed(3); }
function shown(tok) { return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205"; }
function colour(level) {  // white -> deep blue, through the chosen gamma
  var t = Math.pow(level / 255, state.gamma);
  return [Math.round(255 - t * 247), Math.round(255 - t * 207), Math.round(255 - t * 148)];
}
function image(li, hi) {  // an LQ x LK canvas of one head
  var c = document.createElement("canvas");
  c.width = LK; c.height = LQ;
  var ctx = c.getContext("2d");
  var img = ctx.createImageData(LK, LQ), b = bytes(li, hi), lut = [];
  for (var v = 0; v < 256; v++) lut.push(colour(v));
  for (var i = 0; i < b.length; i++) {
    var rgb = lut[b[i]];
    img.data[4 * i] = rgb[0]; img.data[4 * i + 1] = rgb[1];
    img.data[4 * i + 2] = rgb[2]; img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return c;
}
function paint(canvas, li, hi, width) {
  canvas.width = width;
  canvas.height = Math.max(4, Math.round(width * LQ / LK));
  var ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image(li, hi), 0, 0, canvas.width, canvas.height);
}
function cellAt(canvas, event) {
  var r = canvas.getBoundingClientRect();
  var k = Math.floor((event.clientX - r.left) / r.width * LK);
  var q = Math.floor((event.clientY - r.top) / r.height * LQ);
  return (q >= 0 && q < LQ && k >= 0 && k < LK) ? [q, k] : null;
}
function headName(li, hi) {
  return "L" + DATA.layers[li].layer + " H" + DATA.layers[li].heads[hi];
}
function showTip(event, text) {
  var tip = document.getElementById("tip");
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = (event.clientX + 14) + "px";
  tip.style.top = (event.clientY + 14) + "px";
}
function hideTip() { document.getElementById("tip").hidden = true; }
function hoverCell(canvas, li, hi, event) {
  var cell = cellAt(canvas, event);
  if (!cell) { hideTip(); return; }
  var q = cell[0], k = cell[1];
  showTip(event, headName(li, hi) + "\nquery " + q + " " + JSON.stringify(DATA.queries[q]) +
          "\nkey   " + k + " " + JSON.stringify(DATA.keys[k]) +
          "\nweight " + fmt(weight(li, hi, q, k)));
  attendFrom(li, hi, q);
}
function tokenSpans(id) { return document.getElementById(id).children; }
function attendFrom(li, hi, q) {  // colour the keys by the weight query q gives them
  var keys = tokenSpans(SELF ? "queries" : "keys"), queries = tokenSpans("queries");
  for (var i = 0; i < queries.length; i++) queries[i].classList.toggle("focus", i === q);
  for (var k = 0; k < keys.length; k++) {
    var level = bytes(li, hi)[q * LK + k], rgb = colour(level);
    keys[k].style.background = "rgb(" + rgb.join(",") + ")";
    keys[k].style.color = Math.pow(level / 255, state.gamma) > 0.55 ? "#fff" : "#222";
    keys[k].title = "weight " + fmt(weight(li, hi, q, k));
  }
}
function clearAttend() {
  var all = [].slice.call(tokenSpans("queries")).concat([].slice.call(tokenSpans("keys")));
  all.forEach(function (s) {
    s.style.background = ""; s.style.color = ""; s.title = ""; s.classList.remove("focus");
  });
}
function strip(id, tokens) {
  var el = document.getElementById(id);
  el.textContent = "";
  tokens.forEach(function (tok, i) {
    var s = document.createElement("span");
    s.textContent = shown(tok);
    s.dataset.index = i;
    if (id === "queries") {
      s.addEventListener("mouseenter", function () { attendFrom(state.layer, state.head, i); });
      s.addEventListener("mouseleave", clearAttend);
    }
    el.appendChild(s);
  });
}
function selectHead(hi) {
  state.head = hi;
  var figs = document.getElementById("grid").children;
  for (var i = 0; i < figs.length; i++) figs[i].classList.toggle("selected", i === hi);
  document.getElementById("detail-title").textContent = headName(state.layer, hi) +
    "  (" + LQ + " queries x " + LK + " keys)";
  paint(document.getElementById("big"), state.layer, hi, Math.min(520, Math.max(260, 4 * LK)));
}
function legend() {
  var c = document.getElementById("scale"), ctx = c.getContext("2d");
  for (var x = 0; x < c.width; x++) {
    ctx.fillStyle = "rgb(" + colour(Math.round(x / (c.width - 1) * 255)).join(",") + ")";
    ctx.fillRect(x, 0, 1, c.height);
  }
  document.getElementById("lo").textContent = fmt(DATA.lo);
  document.getElementById("hi").textContent = fmt(DATA.hi);
}
function showLayer(li) {
  state.layer = li;
  legend();
  var grid = document.getElementById("grid");
  grid.textContent = "";
  var heads = DATA.layers[li].heads;
  var size = heads.length > 16 ? 80 : 110;
  heads.forEach(function (h, hi) {
    var fig = document.createElement("figure"), c = document.createElement("canvas");
    c.className = "map";
    var cap = document.createElement("figcaption");
    paint(c, li, hi, size);
    cap.textContent = "H" + h;
    c.addEventListener("mousemove", function (e) { hoverCell(c, li, hi, e); });
    c.addEventListener("mouseleave", function () { hideTip(); clearAttend(); });
    fig.addEventListener("click", function () { selectHead(hi); });
    fig.appendChild(c); fig.appendChild(cap); grid.appendChild(fig);
  });
  document.getElementById("layer").value = String(li);
  selectHead(Math.min(state.head, heads.length - 1));
}
function init() {
  document.getElementById("info").textContent = DATA.layers.length + " layers, " +
    LQ + " x " + LK + " tokens, weights to \u00b1" + fmt((DATA.hi - DATA.lo) / 510) +
    " (" + DATA.cells + " stored)";
  var sel = document.getElementById("layer");
  DATA.layers.forEach(function (l, li) {
    var o = document.createElement("option");
    o.value = String(li);
    o.textContent = "L" + l.layer + " (" + l.heads.length + " heads)";
    sel.appendChild(o);
  });
  sel.addEventListener("change", function () { showLayer(Number(sel.value)); });
  var gamma = document.getElementById("gamma");
  gamma.addEventListener("change", function () {
    state.gamma = Number(gamma.value); showLayer(state.layer);
  });
  strip("queries", DATA.queries);
  if (!SELF) {
    strip("keys", DATA.keys);
    document.getElementById("keys").hidden = false;
    document.getElementById("key-label").hidden = false;
  }
  var big = document.getElementById("big");
  big.addEventListener("mousemove", function (e) { hoverCell(big, state.layer, state.head, e); });
  big.addEventListener("mouseleave", function () { hideTip(); clearAttend(); });
  showLayer(0);
}

function selftest() {  // synthetic events; the result goes into <pre id="selftest">
  var checks = {}, last = DATA.layers.length - 1;
  var texts = [].map.call(tokenSpans("queries"), function (s) { return s.textContent; });
  checks.tokens_shown = JSON.stringify(texts) === JSON.stringify(DATA.queries.map(shown));
  var sel = document.getElementById("layer");
  sel.value = String(last);
  sel.dispatchEvent(new Event("change"));
  var figs = document.getElementById("grid").children;
  checks.layer_switch = state.layer === last &&
    figs.length === DATA.layers[last].heads.length;
  var h = figs.length - 1;
  figs[h].dispatchEvent(new MouseEvent("click", { bubbles: true }));
  checks.click_enlarges = state.head === h && figs[h].classList.contains("selected") &&
    document.getElementById("detail-title").textContent.indexOf(headName(last, h)) === 0;
  var big = document.getElementById("big"), r = big.getBoundingClientRect();
  var q = Math.floor(LQ * 2 / 3), k = 0;
  big.dispatchEvent(new MouseEvent("mousemove", { bubbles: true,
    clientX: r.left + (k + 0.5) * r.width / LK, clientY: r.top + (q + 0.5) * r.height / LQ }));
  var tip = document.getElementById("tip");
  checks.cell_hover = !tip.hidden &&
    tip.textContent.indexOf(JSON.stringify(DATA.queries[q])) >= 0 &&
    tip.textContent.indexOf(JSON.stringify(DATA.keys[k])) >= 0 &&
    tip.textContent.indexOf("weight " + fmt(weight(last, h, q, k))) >= 0;
  tokenSpans("queries")[q].dispatchEvent(new MouseEvent("mouseenter"));
  var keys = tokenSpans(SELF ? "queries" : "keys");
  checks.token_hover = keys.length === LK && keys[k].style.background !== "" &&
    keys[k].title === "weight " + fmt(weight(last, h, q, k));
  var ok = true;
  for (var name in checks) ok = ok && checks[name];
  var canvases = [].map.call(document.querySelectorAll("canvas.map"), function (c) {
    var b = c.getBoundingClientRect();
    return [Math.round(b.left), Math.round(b.top), Math.round(b.width), Math.round(b.height)];
  });
  document.getElementById("selftest").textContent = JSON.stringify(
    { ok: ok && window.viewerErrors.length === 0, checks: checks, canvases: canvases });
}

init();
if (/[?&]selftest=1/.test(location.search)) selftest();
</script>
</body>
</html>
"""
