"""MkDocs hooks of the documentation site (``hooks:`` in ``mkdocs.yml``).

Two things the pages need that MkDocs does not do by itself:

* **Links that leave ``docs/``.** The pages are written to be read on GitHub too, so they link
  repository files by relative path (``../benchmarks/results/bench-ops-cpu-vm.md``,
  ``../../benchmarks/diagnostics/char_lm_cuda_eval.py``). The site carries every such file
  under ``repo/<its path in the repository>`` (Markdown rendered as a page, anything else
  copied as is) and each link is rewritten to point there, so the same link works on GitHub
  and on the site, and MkDocs validates it (and its anchor) like any other. A link to a
  missing file or to a directory outside ``docs/`` is a warning, so ``mkdocs build --strict``
  fails on it.
* **Globs in the nav.** A nav entry whose path holds ``*`` (``mechanisms/*.md``) stands for
  every matching page, sorted, titled by its file name, minus the pages the nav lists
  explicitly; so a new mechanism's page joins the site without an edit here
  (docs/contract.md: adding a mechanism touches three files).
* **Globs in the API reference.** A line ``::: package.*`` stands for one ``::: package.module``
  block per public module of the package (its files under ``src/``) that the page does not
  name in a ``:::`` line already; so a new mechanism or task is documented without an edit.

The helpers above the hooks import nothing from MkDocs, so the tests use them without it.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.attnlab")

REPO_PREFIX = "repo/"  # where files from outside docs/ live on the site

# a code span (skipped) or an inline link/image: [text](target "title")
_INLINE = re.compile(r"(?P<code>(`+).+?\2)"
                     r"|(?P<head>!?\[[^\]]*\]\()(?P<url><[^>]*>|[^)\s]+)(?P<tail>(?:\s+\"[^\"]*\")?\))",
                     re.S)
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_chunks(markdown: str) -> Iterator[tuple[bool, str]]:
    """The text in (is_prose, chunk) pieces: fenced code blocks are not prose."""
    fence: str | None = None
    chunk: list[str] = []
    for line in markdown.splitlines(keepends=True):
        match = _FENCE.match(line)
        if fence is None and match:
            if chunk:
                yield True, "".join(chunk)
            chunk, fence = [line], match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] \
                and len(match.group(1)) >= len(fence) and not line.strip()[len(match.group(1)):]:
            chunk.append(line)
            yield False, "".join(chunk)
            chunk, fence = [], None
        else:
            chunk.append(line)
    if chunk:
        yield fence is None, "".join(chunk)


def links(markdown: str) -> list[str]:
    """Every inline link and image target of ``markdown``, outside code."""
    found = []
    for prose, chunk in prose_chunks(markdown):
        if prose:
            found += [m.group("url").strip("<>") for m in _INLINE.finditer(chunk)
                      if m.group("url")]
    return found


def is_relative(url: str) -> bool:
    """A link to a file by relative path (not a URL, an absolute path or a bare anchor)."""
    return bool(url) and not _SCHEME.match(url) and not url.startswith(("#", "/"))


def rewrite_links(markdown: str, rewrite: Any) -> str:
    """``markdown`` with every inline link target ``t`` outside code replaced by
    ``rewrite(t)`` (which returns ``t`` to leave it)."""
    def one(match: re.Match[str]) -> str:
        if match.group("code"):
            return match.group(0)
        url = match.group("url")
        new = rewrite(url.strip("<>"))
        return match.group(0) if new == url.strip("<>") else \
            f"{match.group('head')}{new}{match.group('tail')}"

    return "".join(_INLINE.sub(one, chunk) if prose else chunk
                   for prose, chunk in prose_chunks(markdown))


def expand_nav(nav: Any, docs_dir: Path) -> Any:
    """``nav`` with every path holding ``*`` replaced by the matching pages (sorted, titled by
    file name) that the nav does not list elsewhere."""
    listed: set[str] = set()

    def collect(item: Any) -> None:
        if isinstance(item, str):
            listed.add(item)
        elif isinstance(item, dict):
            for value in item.values():
                collect(value)
        elif isinstance(item, list):
            for value in item:
                collect(value)

    collect(nav)

    def glob(pattern: str) -> list[Any]:
        matches = sorted(p.relative_to(docs_dir).as_posix() for p in docs_dir.glob(pattern))
        pages: list[Any] = [{Path(m).stem: m} for m in matches if m not in listed]
        if not pages:
            log.warning("the nav entry %r matches no page", pattern)
        return pages

    def expand(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for item in items:
            if isinstance(item, str) and "*" in item:
                out += glob(item)
            elif isinstance(item, dict):
                out.append({key: expand(value) if isinstance(value, list)
                            else glob(value) if isinstance(value, str) and "*" in value
                            else value for key, value in item.items()})
            else:
                out.append(item)
        return out

    return expand(nav) if isinstance(nav, list) else nav


_API_GLOB = re.compile(r"^::: ([A-Za-z_][\w.]*)\.\*[ \t]*$", re.M)
_API_LINE = re.compile(r"^::: ([A-Za-z_][\w.]*)[ \t]*$", re.M)


def expand_api_globs(markdown: str, source_dir: Path) -> str:
    """``markdown`` with every ``::: package.*`` line replaced by one ``::: package.module``
    line per public module of ``package`` (found under ``source_dir``) not named already."""
    named = set(_API_LINE.findall(markdown))

    def expand(match: re.Match[str]) -> str:
        package = match.group(1)
        folder = source_dir.joinpath(*package.split("."))
        if not (folder / "__init__.py").is_file():
            log.warning("%s is not a package under %s", package, source_dir)
            return match.group(0)
        modules = sorted(p.stem if p.is_file() else p.name for p in folder.iterdir()
                         if not p.name.startswith("_")
                         and (p.suffix == ".py" or (p / "__init__.py").is_file()))
        return "\n\n".join(f"::: {package}.{m}" for m in modules
                            if f"{package}.{m}" not in named)

    return _API_GLOB.sub(expand, markdown)


def _repo_root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _site_uri(repo_path: str) -> str | None:
    """Where the repository file ``repo_path`` is on the site (None: it is not)."""
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    if repo_path.startswith("../") or repo_path == "..":
        return None
    return REPO_PREFIX + repo_path


def _outside_targets(text: str, repo_path: str, root: Path) -> Iterator[str]:
    """The repository paths of the files outside docs/ that ``text`` (the file at
    ``repo_path``) links to."""
    for url in links(text):
        if is_relative(url):
            path = url.split("#", 1)[0]
            target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), path))
            if path and not target.startswith("docs/") and (root / target).is_file():
                yield target


# --- the hooks -------------------------------------------------------------------------------

def on_config(config: Any) -> Any:
    """Expands the nav's globs."""
    if config["nav"] is not None:
        config["nav"] = expand_nav(config["nav"], Path(config["docs_dir"]))
    return config


def on_files(files: Any, config: Any) -> Any:
    """Adds the files outside docs/ that pages link to (and that those link to)."""
    from mkdocs.structure.files import File

    root = _repo_root(config)
    docs = Path(config["docs_dir"]).resolve().relative_to(root).as_posix()
    if docs != "docs":
        raise ValueError(f"docs/hooks.py expects docs_dir to be docs/, not {docs}/")
    if any(f.src_uri.startswith(REPO_PREFIX) for f in files):
        raise ValueError(f"docs/{REPO_PREFIX} is reserved for files from outside docs/")
    todo = [f"docs/{f.src_uri}" for f in files if f.src_uri.endswith(".md")]
    added: set[str] = set()
    while todo:
        repo_path = todo.pop()
        for target in _outside_targets((root / repo_path).read_text(encoding="utf-8"),
                                       repo_path, root):
            if target not in added:
                added.add(target)
                files.append(File.generated(config, REPO_PREFIX + target,
                                            abs_src_path=str(root / target)))
                if target.endswith(".md"):
                    todo.append(target)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Expands the API pages' globs; points links that leave docs/ at the site's copies of
    their targets."""
    root = _repo_root(config)
    markdown = expand_api_globs(markdown, root / "src")
    uri = page.file.src_uri
    repo_path = uri[len(REPO_PREFIX):] if uri.startswith(REPO_PREFIX) else f"docs/{uri}"

    def rewrite(url: str) -> str:
        if not is_relative(url):
            return url
        path, hash_, anchor = url.partition("#")
        target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), path))
        if target.startswith("docs/") and not uri.startswith(REPO_PREFIX):
            return url  # an ordinary link between pages: MkDocs checks it
        site = _site_uri(target)
        if site is None or not (root / target).exists():
            log.warning("%s: the link %r points to %s, which does not exist", uri, url, target)
            return url
        if (root / target).is_dir():
            log.warning("%s: the link %r points to the directory %s; the site has no folder "
                        "listings: link a file in it", uri, url, target)
            return url
        new = posixpath.relpath(site, posixpath.dirname(uri) or ".")
        return new + hash_ + anchor

    return rewrite_links(markdown, rewrite)
