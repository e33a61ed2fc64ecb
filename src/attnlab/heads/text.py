"""Sentences from what every machine has: the docstrings of Python's standard library.

``docstring_pairs()`` gives (summary, detail) pairs: a docstring's first sentence and the
sentence after it, from the public functions, classes and methods of a fixed list of
standard-library modules, deduplicated, in a fixed order (shuffled by ``seed``). The same
Python version gives the same pairs.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re

MODULES = ("abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar",
           "collections", "configparser", "contextlib", "copy", "csv", "datetime", "decimal",
           "difflib", "email", "enum", "fractions", "functools", "gzip", "hashlib", "heapq",
           "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
           "logging", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint",
           "queue", "random", "re", "shlex", "shutil", "socket", "sqlite3", "statistics",
           "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
           "time", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse",
           "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zlib")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(doc: str) -> list[str]:
    paragraph = doc.split("\n\n")[0] if doc else ""
    text = " ".join(paragraph.split())
    return [s for s in _SENTENCE.split(text) if s]


def _good(sentence: str) -> bool:
    words = sentence.split()
    return (6 <= len(words) <= 40 and sentence.isascii() and sentence[0].isupper()
            and sentence.endswith(".") and ">>>" not in sentence)


def docstring_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """Every (first sentence, second sentence) pair of a standard-library docstring whose
    two sentences are plain prose of 6-40 words, shuffled by ``seed``."""
    seen, pairs = set(), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module this Python lacks
            continue
        objects = [getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")]
        members = []
        for obj in objects:
            members.append(obj)
            if inspect.isclass(obj):
                members += [getattr(obj, a, None) for a in sorted(vars(obj))
                            if not a.startswith("_")]
        for obj in members:
            doc = inspect.getdoc(obj) if callable(obj) else None
            parts = _sentences(doc or "")
            if len(parts) >= 2 and _good(parts[0]) and _good(parts[1]) and parts[0] not in seen:
                seen.add(parts[0])
                pairs.append((parts[0], parts[1]))
    pairs.sort()
    random.Random(seed).shuffle(pairs)
    return pairs
