"""Everything that imports megatron.core: parallel setup, CPU compatibility, models, train step,
optimizer and checkpoints."""

import warnings

import torch

if not torch.cuda.is_available():
    # Expected on CPU machines: megatron-core falls back to torch implementations. On GPUs they stay
    # visible (Transformer Engine should be installed there).
    for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
        warnings.filterwarnings("ignore", message=_message, category=UserWarning)
