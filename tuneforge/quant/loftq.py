"""LoftQ moved to tuneforge.adapters.loftq (an adapter init; quant/ knows nothing of adapters).
These names stay importable from here for code written against the old place."""

from tuneforge.adapters.loftq import (  # noqa: F401
    PENDING,
    PENDING_DTYPE,
    _dequantize,
    apply_loftq,
    finish_pending,
    load_adapter_for_base,
    loftq_decompose,
    loftq_record,
    refuse_merging,
    take_pending,
)
