"""The rollout side: vLLM engines and servers, prompts, tasks and rewards, and the weight sync's engine end.
Imports the algorithm core and the batch type, never megatron-core (gift_megatron/megatron/)."""

GLOO_BACKEND = "gift_gloo"
"""The name our gloo weight-transfer engine pair is registered under in vLLM (weight_transfer.register,
gloo_transfer)."""
