"""Checkpoint conversion: HF logits == megatron logits at TP1/TP2/PP2, exact round trips, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gift_megatron.config import ModelConfig
from gift_megatron.convert.hf_config import hf_config_from_model, model_config_from_hf
from gift_megatron.convert.mapping import ModelMapping
from gift_megatron.launch import run_distributed
from tests.hf_models import FAMILIES, VOCAB, hf_logits, input_ids, save_tiny_model


def _megatron_logits(chunks, seq_len: int):
    """Full-vocab logits of tests.hf_models.input_ids() on the last stage (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids = input_ids(seq=seq_len)
    captured = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        pos = torch.arange(seq_len)[None].expand(batch.shape[0], -1)
        mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1)[None, None]
        return model(batch, pos, mask), lambda out: (captured.append(out.detach()) or out.sum() * 0,
                                                     torch.zeros((), dtype=torch.int), {})

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=chunks[0],
                                num_microbatches=1, seq_length=seq_len, micro_batch_size=ids.shape[0],
                                forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    parts = [torch.empty_like(captured[0]) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, captured[0].contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)[..., :VOCAB]


def _load_and_run(preset, world, tp, pp, weights):
    from gift_megatron.config import ParallelConfig
    from gift_megatron.megatron.checkpoint import load_model_weights
    from gift_megatron.megatron.conversion import read_preset
    from gift_megatron.megatron.model import build_gpt_models
    from gift_megatron.megatron.parallel import init_model_parallel

    model = read_preset(preset)
    parallel = ParallelConfig(world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_model_parallel(parallel, seed=123, on_gpu=False)
    chunks = build_gpt_models(model, parallel, on_gpu=False)
    load_model_weights(weights, chunks)
    return _megatron_logits(chunks, 12)


def _convert_worker(rank, world, hf_dir, out, tp, back):
    from gift_megatron.megatron.conversion import hf_to_mcore, mcore_to_hf

    hf_to_mcore(hf_dir, out, tensor_model_parallel_size=tp, progress=False)
    logits = _load_and_run(f"{out}/model.yaml", 1, 1, 1, f"{out}/weights")
    mcore_to_hf(f"{out}/weights", back, progress=False)
    return logits


def _layout_worker(rank, world, out, tp, pp):
    return _load_and_run(f"{out}/model.yaml", world, tp, pp, f"{out}/weights")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    save_tiny_model(family, str(root / "hf"))
    tp1 = run_distributed(_convert_worker, 1, str(root / "hf"), str(root / "mc"), 2, str(root / "back"))[0]
    return family, root, hf_logits(str(root / "hf")), tp1


def test_hf_logits_equal_megatron_logits_at_tp1(converted):
    family, _, want, got = converted
    assert want.abs().max() > 1.0, "logits must differ meaningfully"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_hf_logits_equal_megatron_logits_at_other_layouts(converted, tp, pp):
    family, root, want, _ = converted
    results = run_distributed(_layout_worker, tp * pp, str(root / "mc"), tp, pp)
    got = [r for r in results if r is not None]
    assert got
    for logits in got:
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)


def test_round_trip_is_bit_identical_and_loads_in_transformers(converted):
    family, root, want, _ = converted
    original = load_file(str(root / "hf" / "model.safetensors"))
    back = load_file(str(root / "back" / "model.safetensors"))
    assert sorted(original) == sorted(back)
    for name in original:
        assert torch.equal(original[name], back[name]), name
    torch.testing.assert_close(hf_logits(str(root / "back")), want, rtol=0, atol=0)


def _training_ckpt_worker(rank, world, out, ckpt_root):
    """A training checkpoint (policy + distributed optimizer) written at TP = 2."""
    from gift_megatron.config import Config, DataConfig, ParallelConfig, RolloutConfig
    from gift_megatron.megatron.checkpoint import load_model_weights, save_checkpoint
    from gift_megatron.megatron.conversion import read_preset
    from gift_megatron.megatron.parallel import init_model_parallel
    from gift_megatron.megatron.policy import build_policy

    cfg = Config(model=read_preset(f"{out}/model.yaml"), data=DataConfig(num_prompts_per_step=8),
                 parallel=ParallelConfig(world_size=2, tensor_model_parallel_size=2), device="cpu",
                 rollout=RolloutConfig(engine="vllm_server"))
    init_model_parallel(cfg.parallel, seed=5, on_gpu=False)
    policy = build_policy(cfg.model, cfg.parallel, cfg.optim, on_gpu=False, total_optimizer_steps=10)
    load_model_weights(f"{out}/weights", policy.chunks)
    save_checkpoint(ckpt_root, 7, policy, {})
    return {}


def _export_worker(rank, world, ckpt, preset, out):
    from gift_megatron.megatron.conversion import mcore_to_hf

    mcore_to_hf(ckpt, out, model_config=preset, progress=False)
    return {}


def test_training_checkpoint_at_tp2_exports_to_hf(converted, tmp_path):
    family, root, want, _ = converted
    run_distributed(_training_ckpt_worker, 2, str(root / "mc"), str(tmp_path / "ckpts"))
    ckpt = tmp_path / "ckpts" / "step_00000007"
    run_distributed(_export_worker, 1, str(ckpt), str(root / "mc" / "model.yaml"), str(tmp_path / "hf"))
    original = load_file(str(root / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(torch.equal(original[n], back[n]) for n in original) and sorted(original) == sorted(back)


def _errors_worker(rank, world, folders):
    from gift_megatron.megatron.conversion import hf_to_mcore, mcore_to_hf

    messages = {}
    for case, (hf_dir, out) in folders.items():
        try:
            if case == "not_a_checkpoint":
                mcore_to_hf(hf_dir, out, model_config=f"{hf_dir}/model.yaml", progress=False)
            else:
                hf_to_mcore(hf_dir, out, progress=False, tensor_model_parallel_size=3 if case == "bad_tp" else 1)
            messages[case] = "no error"
        except ValueError as e:
            messages[case] = str(e)
    return messages


def test_bad_inputs_name_the_tensor_or_field(tmp_path):
    good = tmp_path / "good"
    save_tiny_model("qwen2", str(good))
    folders = {}

    def variant(case, edit_config=None, edit_tensors=None):
        d = tmp_path / case
        shutil.copytree(good, d)
        if edit_config:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        if edit_tensors:
            tensors = load_file(str(d / "model.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        folders[case] = (str(d), str(tmp_path / f"{case}_out"))

    variant("missing", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    variant("shape", edit_tensors=lambda t: t.__setitem__("model.layers.2.self_attn.k_proj.weight",
                                                          torch.zeros(32, 64)))
    variant("arch", edit_config=lambda c: c.__setitem__("architectures", ["GPT2LMHeadModel"]))
    variant("bad_tp")
    variant("corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    variant("not_a_checkpoint")
    msgs = run_distributed(_errors_worker, 1, folders)[0]
    assert "tensor 'model.layers.1.mlp.up_proj.weight' is missing" in msgs["missing"]
    assert "tensor 'model.layers.2.self_attn.k_proj.weight' has shape (32, 64) but the config implies (64, 64)" in \
        msgs["shape"]
    assert "architecture ['GPT2LMHeadModel'] is not supported" in msgs["arch"]
    assert "Qwen2ForCausalLM" in msgs["arch"]
    assert "--tensor-model-parallel-size 3 does not divide num_attention_heads=4" in msgs["bad_tp"]
    assert "model.safetensors: cannot read safetensors file" in msgs["corrupt"]
    assert "is not a megatron dist checkpoint (no metadata.json)" in msgs["not_a_checkpoint"]


def _config(**hf):
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 60, **hf}


def test_hf_config_translation(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config(
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        torch_dtype="bfloat16", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})))
    m = model_config_from_hf(tmp_path)
    assert (m.arch, m.num_query_groups, m.kv_channels, m.rotary_base, m.norm_epsilon) == ("llama", 2, 16, 5e5, 1e-5)
    assert m.rope_scaling and m.rope_scaling_factor == 8.0 and not m.untie_embeddings_and_output_weights
    assert m.params_dtype == "bfloat16" and not m.add_qkv_bias and not m.qk_layernorm
    # transformers 5 layout (rope_parameters) and a round trip through our writer
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(m)))
    assert model_config_from_hf(tmp_path, name=m.name) == m


@pytest.mark.parametrize("edit,message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 4096}},
     "original_max_position_embeddings=4096 is not supported"),
])
def test_hf_config_unsupported_features_are_named(tmp_path, edit, message):
    (tmp_path / "config.json").write_text(json.dumps(_config(**edit)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_config_from_hf(tmp_path)


def test_qkv_and_fc1_layouts_by_hand():
    """2 query groups x (2 q heads + k + v), head dim 1: the fused rows interleave per group."""
    m = ModelMapping(arch="qwen2", num_layers=1, hidden_size=1, ffn_hidden_size=2, num_attention_heads=4,
                     num_query_groups=2, kv_channels=1, vocab_size=3, padded_vocab_size=4, tied_embeddings=True)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = m.to_mcore(name, [q, k, v])
    assert fused.view(-1).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert m.shard(name, fused, 1, 2).view(-1).tolist() == [2, 3, 11, 21]  # TP rank 1: group 1 whole
    back = m.to_hf(name, m.unshard(name, [m.shard(name, fused, r, 2) for r in range(2)]))
    assert torch.equal(back["model.layers.0.self_attn.q_proj.weight"], q)
    bias = m.to_mcore("decoder.layers.0.self_attention.linear_qkv.bias", [q.view(-1), k.view(-1), v.view(-1)])
    assert bias.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    gate, up = torch.tensor([[1.0], [2]]), torch.tensor([[3.0], [4]])
    full = m.to_mcore(fc1, [gate, up])
    assert [m.shard(fc1, full, r, 2).view(-1).tolist() for r in range(2)] == [[1, 3], [2, 4]]  # [gate_r; up_r]
    assert torch.equal(m.unshard(fc1, [m.shard(fc1, full, r, 2) for r in range(2)]), full)
    emb = m.to_mcore("embedding.word_embeddings.weight", [torch.ones(3, 1)])
    assert emb.view(-1).tolist() == [1, 1, 1, 0]  # padded with a zero row
    assert m.to_hf("embedding.word_embeddings.weight", emb)["model.embed_tokens.weight"].shape == (3, 1)
    assert "output_layer.weight" not in m.rules  # tied


def test_every_hf_name_is_mapped_once_for_each_family():
    for arch in ("llama", "qwen2", "qwen3"):
        model = ModelConfig(arch=arch, num_layers=3, add_qkv_bias=arch == "qwen2", qk_layernorm=arch == "qwen3")
        names = ModelMapping.from_config(model, 64).hf_names()
        assert len(names) == len(set(names))
        per_layer = {"llama": 9, "qwen2": 12, "qwen3": 11}[arch]
        assert len(names) == 3 * per_layer + 3  # + embed, norm, lm_head (untied)


def test_a_conversion_into_a_folder_in_use_is_refused(tmp_path):
    """The output folder is locked while a conversion writes it (run_dir.RunLock): a second writer, or a
    run holding the folder, makes the conversion refuse before it writes anything."""
    from gift_megatron.megatron.conversion import hf_to_mcore
    from gift_megatron.run_dir import LOCK_NAME, RunDirBusy, RunLock

    hf, out = tmp_path / "hf", tmp_path / "out"
    save_tiny_model("llama", str(hf))
    with RunLock(out).acquire("another writer"):
        with pytest.raises(RunDirBusy, match='in use by another process: .*"what": "another writer"'):
            hf_to_mcore(hf, out, progress=False)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
