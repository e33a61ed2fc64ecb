"""``python -m attnlab`` runs the ``attnlab`` command (and ``torchrun -m attnlab ...``
launches it once per process)."""

from attnlab.cli import main

main()
