"""How the data layer reports what it will not use: a JSON value's type in words, and the
examples of one dataset left out, counted by reason, as one warning line (or one error line
when nothing is left).

Policy (one rule for every format): a value of the wrong type, or a role the registry does not
name, is refused with a `DataError` naming the record; a well-typed record that is not a
complete conversation (LLaMA-Factory's "invalid example": roles out of order, a last user turn
with no reply, an empty reply) is dropped and counted here, as LLaMA-Factory drops it.
"""

from __future__ import annotations

import logging

from tuneforge.errors import DataError

logger = logging.getLogger(__name__)


def describe_value(value) -> str:
    """A JSON value in words for messages: 'a number (5)', 'a list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


class Drops:
    """The examples of one dataset left out at one stage, counted by reason.

    `add(reason, where)` records one ("with an empty reply", "data/d.json record 3");
    `report(total, none_left, fix)` then warns once, in one line, with the counts and the first
    place of each reason, or raises a DataError (`none_left`, then the counts) when all `total`
    examples were left out.
    """

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{count} {reason} (first: {self.first[reason]})"
                         for reason, count in self.counts.items())

    def report(self, total: int, none_left: str, fix: str) -> None:
        """Warn about the dropped examples in one line; raise DataError if none of `total` is left."""
        dropped = len(self)
        if not dropped:
            return
        if dropped >= total:
            raise DataError(f"dataset {self.dataset!r}: {none_left}: {self.summary()}; {fix}")
        logger.warning("dropped %d of %d examples of %r: %s; %s",
                       dropped, total, self.dataset, self.summary(), fix)
