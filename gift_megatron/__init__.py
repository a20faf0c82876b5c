"""gift-megatron: Megatron-style model-parallel trainer for GIFT (with GRPO, DAPO and GSPO baselines).

Layout: `algo/` pure-torch losses and log-probs; `megatron/` everything that imports megatron.core;
`rollout/` vLLM engines, weight sync, rewards and data; `convert/` HF <-> Megatron name mappings;
`config.py` the typed Hydra schemas; `train.py` the entry point.
"""

__version__ = "0.1.0"
