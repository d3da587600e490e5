"""The head a stage needs on top of the model the loader returns (Stage.head, a key of
stages.table.HEADS): `prepare_head` puts it on the model before training and makes the run's
saves write it too.

- causal_lm: the model's own head; nothing to do."""

from __future__ import annotations


def _as_is(model, setup):
    return model, setup


BUILDERS = {"causal_lm": _as_is}


def prepare_head(name: str, model, setup):
    """(model, setup) with head `name` on the model and in setup's saves (train.methods'
    TrainableSetup). An unknown name is a programming error (a Stage checks it): KeyError."""
    return BUILDERS[name](model, setup)
