"""The peers a contestant may need, each an optional install: whether it is usable here, and
if not, why (with the command that installs it)."""

from __future__ import annotations

import functools
import importlib

PEERS = {  # peer -> (module to import, how to install it)
    "attnlab": (None, None),
    "torch": (None, None),
    "flex": ("torch.nn.attention.flex_attention", "torch >= 2.5"),
    "natten": ("natten", "pip install 'attnlab[bench]' (NATTEN)"),
    "fla": ("fla.ops.linear_attn", "pip install 'attnlab[bench]' (flash-linear-attention, "
                                   "which needs triton: CUDA only)"),
    "x-transformers": ("x_transformers.attend", "pip install 'attnlab[bench]' (x-transformers)"),
}


@functools.cache
def peer_missing(peer: str) -> str | None:
    """None when ``peer`` can be imported, else why not and how to install it."""
    module, install = PEERS[peer]
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - an ImportError, or a peer failing at import
        return f"{peer} is not usable here ({type(err).__name__}: {err}); {install}"
    return None


def peer_versions() -> dict[str, str]:
    """Versions of the installed peers (recorded with every result)."""
    import torch

    versions: dict[str, str] = {"torch": torch.__version__}
    for peer, dist in (("natten", "natten"), ("fla", "flash-linear-attention"),
                       ("x-transformers", "x-transformers")):
        if peer_missing(peer) is None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions[peer] = version(dist)
            except PackageNotFoundError:  # pragma: no cover - importable, not installed
                versions[peer] = "unknown"
    return versions
