"""Training stages, one file each, in one table (table.py): `STAGES[name]` is the Stage record
that `tuneforge train` runs for `stage: name`. Importing this package registers them all."""

from .table import (HEADS, RECORD_KINDS, STAGE_KEYS, STAGES, Objective, Stage, get_stage, register_stage,
                    stage_key, stages_help)
from . import pt, rm, sft  # noqa: E402,F401  (each import registers its stage)
from . import dpo, kto  # noqa: E402,F401  (listed after sft, pt and rm)
from . import cls, semi  # noqa: E402,F401
from . import kd  # noqa: E402,F401
from . import grpo, ppo  # noqa: E402,F401

__all__ = ["HEADS", "RECORD_KINDS", "STAGE_KEYS", "STAGES", "Objective", "Stage", "get_stage",
           "register_stage", "stage_key", "stages_help"]
