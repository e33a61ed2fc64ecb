"""The ``attnlab`` command line: ``main`` (the group) and one module per command group
(``arena``, ``bench``, ``heads``, ``search``)."""

from attnlab.cli.main import console, main, registry_markdown

__all__ = ["console", "main", "registry_markdown"]
