"""Training: the loop, checkpoints, fine-tuning types and reporting.

The package is also callable as `tuneforge.train(config)` (see tuneforge/entry.py: importing it
replaces the function of that name on tuneforge)."""

from tuneforge import entry

entry.callable_package(__name__, entry.train)
