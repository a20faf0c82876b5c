"""Tiny random Hugging Face models, built and saved in the test (never downloaded)."""

from __future__ import annotations

import torch

VOCAB = 60  # deliberately not a multiple of the TP padding, so padding is exercised
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.3, rms_norm_eps=1e-5)
FAMILIES = {
    # Llama 3.1 with its RoPE scaling (megatron's constants), untied output layer
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=True)),  # QKV bias
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=False)),  # QK-norm
}


def save_tiny_model(family: str, folder: str, seed: int = 0):
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them count
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    return model


def input_ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def hf_logits(folder: str) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids()).logits
