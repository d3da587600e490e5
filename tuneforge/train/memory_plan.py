"""Gradient checkpointing chosen by memory when the config leaves it empty.

Without checkpointing a decoder layer keeps, per token, the tensors its backward pass reads
(fp32 unless the run computes in 16 bits): the two RMSNorms' inputs and outputs (4 d), the
rotated queries and keys and the values (d + 2 kv), the attention output (d), the MLP's gate,
up, activated gate and product (4 i): about 6 d + 2 kv + 4 i values, with d the hidden size,
kv the key/value width and i the MLP's width (SmolLM2-135M: 1.3 MB per token for its 30
layers). With checkpointing only each layer's input is kept (d values) and one layer's
tensors are rebuilt at a time in backward: less memory for about a third more compute.

The count is a lower bound: on SmolLM2-135M with LoRA, a micro-batch of 1,062 tokens kept
2.1 GB (peak RSS without checkpointing minus with it, benchmarks/whole_job.py) where it gives
1.27 GB (attention internals, copies, the allocator's slack), so it is scaled by MEASURED_OVER_COUNT.
The estimate for one training forward (forward_tokens: per_device_train_batch_size x cutoff_len
tokens, the most a micro-batch can hold, or one part's where the stage runs micro-batches as parts,
train/parts.py: cutoff_len) is compared with the memory still available after the model is loaded; above
HEADROOM of it, checkpointing goes on with one log line. gradient_checkpointing (or
disable_gradient_checkpointing) set in the config always wins."""

from __future__ import annotations

from pathlib import Path

import torch

HEADROOM = 0.5  # activations may take up to half of the memory left after loading the model
MEASURED_OVER_COUNT = 1.65  # kept bytes measured / activation_bytes (module docstring)


def activation_bytes(config, tokens: int, element_bytes: int = 4, lean_mlp: bool = False,
                     lean_norms: bool = False) -> int:
    """Bytes a transformers decoder config's layers keep for backward over `tokens` tokens
    without checkpointing (the module docstring's count; with lean_mlp the gated MLP keeps 2 i
    instead of 4 i, train/lean_mlp.py; with lean_norms the norms keep 2 d instead of 4 d,
    train/lean_layers.py); 0 where the config lacks the sizes."""
    d = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not d or not layers:
        return 0
    i = getattr(config, "intermediate_size", None) or 4 * d
    heads = getattr(config, "num_attention_heads", None) or 1
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return layers * tokens * ((4 if lean_norms else 6) * d + 2 * kv + (2 if lean_mlp else 4) * i) * element_bytes


def forward_tokens(stage, model, examples: int, sequences: int, cutoff_len: int) -> tuple[int, str | None]:
    """(the most token positions one training forward holds, a log line or None) for micro-batches
    of `examples` examples of `sequences` sequences (pairwise: 2) of up to `cutoff_len` tokens: one
    part where the stage runs micro-batches as parts (Stage.part_tokens; train/parts.py plan),
    else the whole micro-batch."""
    group = sequences * cutoff_len
    if stage.part_tokens is None:
        return examples * group, None
    from .parts import plan

    return plan(model, examples, group, cutoff_len if stage.part_tokens == "cutoff_len" else stage.part_tokens)


def available_bytes(device: torch.device | str = "cpu", meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Free memory of the device now: the GPU's free bytes, or the system's MemAvailable;
    None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_checkpointing(model, tokens: int, element_bytes: int, available: int | None,
                         lean_mlp: bool = False, lean_norms: bool = False) -> str | None:
    """A log line when a micro-batch's activations (activation_bytes) would take more than
    HEADROOM of `available` bytes, so checkpointing should go on; None to keep them."""
    need = MEASURED_OVER_COUNT * activation_bytes(getattr(model, "config", None), tokens, element_bytes,
                                                 lean_mlp, lean_norms)
    if available is None or need <= HEADROOM * available:
        return None
    gb = 1 << 30
    return (f"gradient checkpointing: on, as a batch of {tokens} tokens would keep ~{need / gb:.1f} GB of "
            f"activations and {available / gb:.1f} GB are free (set gradient_checkpointing: false to keep "
            "them, faster)")
