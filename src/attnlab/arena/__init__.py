"""The arena: configs, trainer, run store, sweeps, statistics and reports (docs/arena.md)."""
