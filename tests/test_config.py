"""Every config under conf/ composes and validates; every check names the field and the fix."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gift_megatron.algo import ALGORITHMS, GiftOptions
from gift_megatron.config import AlgoConfig, Config, register_configs, to_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
# Options that only make sense with others (a 32-GPU layout needs a model that it divides).
COMPANIONS = {
    ("data", "gsm8k_jsonl"): ["data.path=/data/prompts.jsonl", "data.tokenizer=/models/qwen", "model=qwen2.5_7b"],
    ("experiment", "qwen2.5_32b_gift"): ["data.path=/data/prompts.jsonl", "data.tokenizer=/models/qwen"],
    ("parallel", "tp8_pp2_dp2"): ["model=qwen2.5_32b", "device=cuda", "algo.group_size=16", "rollout=vllm_servers"],
    ("parallel", "tp2"): ["rollout=vllm_servers"],
    ("experiment", "hf_math"): ["data.path=/data/gsm8k.jsonl", "model.hf_path=/ckpt/m/hf",
                                "model.max_position_embeddings=8192"],
}


def compose_config(*overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def test_default_config():
    cfg = compose_config()
    names = (cfg.algo.name, cfg.model.name, cfg.rollout.engine, cfg.data.name)
    assert names == ("gift", "tiny-llama", "vllm", "addition")
    assert cfg.model.kv_channels == 32 and cfg.parallel.data_parallel_size == 1
    assert cfg.algo.needs_reference and not cfg.algo.needs_proximal_logprobs


def _differences(a, b, prefix: str = "") -> list[str]:
    import dataclasses

    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out += _differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(f"{prefix}{f.name}: schema {x!r}, conf {y!r}")
    return out


def test_the_schema_defaults_are_the_embedded_default():
    """`Config()` (what code that builds configs directly gets, and what each field's doc describes)
    and `gift-train` with no overrides agree on every field but one: the vocabulary padding, which
    is megatron-core's 128 for real models while the tiny preset's 64 tokens are kept unpadded."""
    assert _differences(Config(), compose_config()) == ["model.make_vocab_size_divisible_by: schema 128, conf 1"]


def test_every_group_option_is_listed():
    assert set(GROUPS) == {"algo", "data", "experiment", "hydra", "model", "optim", "parallel", "rollout"}
    assert {"gift", "grpo", "dapo", "gspo"} <= {name for g, name in OPTIONS if g == "algo"}
    assert {"tiny_llama", "qwen2.5_7b", "qwen2.5_32b", "llama3.1_8b"} <= {n for g, n in OPTIONS if g == "model"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_config_composes_and_validates(group, option):
    cfg = compose_config(f"{group}={option}", *COMPANIONS.get((group, option), []))
    assert isinstance(cfg, Config)
    if group not in ("experiment",):
        yaml = OmegaConf.load(CONF / group / f"{option}.yaml")
        section = OmegaConf.structured(getattr(cfg, group))
        for key in yaml:
            if not OmegaConf.is_missing(yaml, key):
                assert section[key] == yaml[key], f"{group}/{option}: {key}"


def test_real_model_presets_have_their_published_sizes():
    sizes = {name: compose_config(f"model={name}").model for name in ("qwen2.5_7b", "qwen2.5_32b", "llama3.1_8b")}
    m = sizes["qwen2.5_32b"]
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        64, 5120, 27648, 40, 8)
    assert m.add_qkv_bias and m.vocab_size == 152064
    assert sizes["llama3.1_8b"].rope_scaling and sizes["llama3.1_8b"].rotary_base == 500000.0
    assert sizes["qwen2.5_7b"].num_query_groups == 4


def test_32b_experiment_layout():
    cfg = compose_config("experiment=qwen2.5_32b_gift", "data.path=/data/train.jsonl", "data.tokenizer=/models/q")
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size) == (8, 2, 2)
    assert cfg.model.fp8 == "hybrid" and cfg.algo.group_size == 16 and cfg.optim.lr == 1e-6
    assert cfg.rollout.tensor_parallel_size == 4 and cfg.device == "cuda"


def test_hydra_type_checks_fields():
    with pytest.raises(Exception, match="algo.group_size"):
        compose_config("algo.group_size=eight")


ERRORS = [
    (["model.num_attention_heads=6", "model.num_query_groups=4"], "model.num_attention_heads=6 is not a multiple"),
    (["parallel=tp2", "model.num_attention_heads=3", "model.num_query_groups=3"],
     "model.num_attention_heads=3 is not divisible by parallel.tensor_model_parallel_size=2"),
    (["parallel.world_size=3", "parallel.tensor_model_parallel_size=2"], "parallel.world_size=3 is not divisible"),
    (["parallel.world_size=2", "parallel.pipeline_model_parallel_size=2", "model.num_layers=3"],
     "model.num_layers=3 is not divisible by the 2 pipeline stages"),
    (["parallel.virtual_pipeline_model_parallel_size=2"], "needs pipeline_model_parallel_size >= 2"),
    (["parallel.world_size=3", "algo.group_size=8"], "algo.group_size=8 is not divisible by the data-parallel size 3"),
    (["parallel.micro_batch_size=12"], "parallel.micro_batch_size=12 is not a multiple of G/DP=8"),
    (["algo.num_mini_batches=5"], "data.num_prompts_per_step=32 is not divisible by algo.num_mini_batches=5"),
    (["parallel.micro_batch_size=48"], "a mini-batch has 256 samples per DP rank"),
    (["parallel.sequence_packing=true"], "parallel.sequence_packing packs rows of up to "
                                         "parallel.max_tokens_per_micro_batch tokens: set that too"),
    (["parallel.sequence_packing=true", "parallel.max_tokens_per_micro_batch=64",
      "model.transformer_impl=transformer_engine"], "parallel.sequence_packing runs on the local attention spec"),
    (["parallel.max_tokens_per_micro_batch=-1"], "parallel.max_tokens_per_micro_batch=-1 must be >= 0"),
    (["parallel.max_tokens_per_micro_batch=21"], "parallel.max_tokens_per_micro_batch=21 is below the longest "
                                                 "sequence, data.max_prompt_length + rollout.max_new_tokens = 22"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs tensor_model_parallel_size > 1"),
    (["model.kv_channels=16", "device=cpu"], "model.kv_channels=16 (head dim) is not supported by vLLM on CPU"),
    (["rollout.tensor_parallel_size=2", "device=cpu"], "rollout.tensor_parallel_size must be 1 on CPU"),
    (["model.fp8=hybrid", "device=cpu"], "model.fp8 needs a GPU with Transformer Engine"),
    (["model.fp8=hybrid", "model.transformer_impl=local"], "model.fp8 needs Transformer Engine"),
    (["model.fp8=e5m2"], "model.fp8='e5m2' is not supported"),
    (["model.arch=gpt2"], "model.arch='gpt2' is not supported"),
    (["algo.name=ppo"], "algo.name='ppo' is not supported"),
    (["algo.baseline=policy"], "algo.baseline='policy' is not supported"),
    (["algo.loss_agg_mode=sum"], "algo.loss_agg_mode='sum' is not supported"),
    (["algo.implicit_std_floor=0"], "algo.implicit_std_floor=0.0 must be > 0"),
    (["algo.group_size=1", "parallel.micro_batch_size=32"], "algo.group_size must be >= 2 for GIFT"),
    (["algo.clip_ratio_low=-0.1"], "algo.clip_ratio_low=-0.1 must be >= 0"),
    (["rollout.engine=sglang"], "rollout.engine='sglang' is not supported"),
    (["rollout.top_p=1.5"], "rollout.top_p=1.5 must be in (0, 1]"),
    # found by tests/test_config_fuzz.py: each passed composition and failed after start-up
    (["optim.lr=1e30"], "optim.lr=1e+30 must be in (0, 1]"),
    (["optim.weight_decay=2"], "optim.weight_decay=2.0 must be in [0, 1]"),
    (["rollout=vllm_servers", "rollout.temperature=3"], "rollout.temperature=3.0: vLLM's OpenAI server accepts 0 to 2"),
    (["rollout.top_p=0.9"], "rollout.top_p=0.9: the engine's log-probs would be of the top-p renormalised"),
    (["data.num_eval_prompts=0"], "data.num_eval_prompts=0: the addition task holds out 1 to 8099"),
    (["rollout.request_timeout_s=1e30"], "rollout.request_timeout_s=1e+30 must be in (0, 10000000.0]"),
    (["parallel=tp2", "parallel.sequence_parallel=true", "device=cpu"],
     "parallel.sequence_parallel needs Transformer Engine (or apex) norms on a GPU"),
    (["rollout.verify_every=-1"], "rollout.verify_every=-1: use N >= 1"),
    (["algo=grpo", "algo.reference_refresh_every=10"], "algo grpo uses no reference"),
    (["rollout.max_staleness=-1"], "rollout.max_staleness=-1 must be >= 0"),
    (["algo.tis_cap=2"], "GIFT's loss has no importance ratio to correct"),
    (["algo=grpo", "algo.tis_cap=0.5"], "would scale down even on-policy tokens"),
    (["algo=grpo", "algo.tis_cap=-1"], "algo.tis_cap=-1.0 must be >= 0"),
    (["rollout.on_server_failure=ignore"], "rollout.on_server_failure='ignore' is not supported"),
    (["data.name=jsonl"], "data.name=jsonl needs data.path=/path/to/prompts.jsonl"),
    (["data.name=jsonl", "data.path=/p.jsonl"], "data.name=jsonl needs data.tokenizer=/path/to/hf_tokenizer_folder"),
    (["data.warmup_max_steps=-1"], "data.warmup_max_steps=-1 must be >= 0"),
    (["parallel=tp2"], "parallel.world_size=2 with the in-process vLLM engine"),
    (["parallel.offload_reference=true", "device=cpu"], "parallel.offload_reference moves the reference"),
    (["rollout.weight_sync=nccl", "device=cpu"], "rollout.weight_sync=nccl needs GPUs"),
    (["rollout=vllm_servers", "rollout.weight_sync=gloo", "rollout.on_server_failure=failover"],
     "rollout.weight_sync=gloo puts every server in one process group"),
    (["model.recompute=some"], "model.recompute='some' is not supported"),
    (["reward.terms=[{kind:bleu}]"], "reward.terms[].kind='bleu' is not supported"),
    (["reward.terms=[{kind:reward_model}]"], "kind=reward_model needs path=/path/to/hf_reward_model"),
    (["reward.num_workers=0"], "reward.num_workers=0 must be > 0"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
    (["optim.min_lr=1"], "optim.min_lr=1.0 exceeds optim.lr"),
    (["optim.lr_decay_style=step"], "optim.lr_decay_style='step' is not supported"),
    (["device=tpu"], "device='tpu' is not supported"),
    (["model.arch=qwen2"], "model.arch=qwen2 has QKV biases (every Qwen2/2.5 model does): set model.add_qkv_bias"),
    (["model.arch=qwen3"], "model.arch=qwen3 has QK-norm (every Qwen3 model does): set model.qk_layernorm=true"),
    (["log_level=LOUD"], "log_level='LOUD' is not supported"),
    (["keep_last_checkpoints=-1"], "keep_last_checkpoints=-1 must be > 0"),
    (["keep_last_checkpoints=0"], "keep_last_checkpoints=0 must be > 0"),
    (["save_every=0"], "save_every=0 must be > 0"),
    (["num_steps=-5"], "num_steps=-5 must be > 0"),
    (["data.max_prompt_length=60"], "data.max_prompt_length=60 + rollout.max_new_tokens=6 = 66 exceeds the model's "
                                     "context, model.max_position_embeddings=64: lower one of them"),
    (["eval_every=0"], "eval_every=0 must be > 0"),
    (["eval_num_samples=1"], "eval_num_samples=1: use 0 (greedy only) or k >= 2"),
    (["rollout.weight_sync_bucket_mb=0"], "rollout.weight_sync_bucket_mb=0.0 must be > 0"),
    (["rollout.max_logprob_mismatch=-1"], "rollout.max_logprob_mismatch=-1.0 must be > 0"),
    (["rollout.mismatch_patience=0"], "rollout.mismatch_patience=0 must be > 0"),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_config_errors_name_field_and_fix(overrides, message):
    with pytest.raises(ValueError) as err:
        compose_config(*overrides)
    assert message in str(err.value)


def test_model_preset_replaces_the_model_group_and_overrides_still_win(tmp_path):
    """`model_preset=OUT/model.yaml` (tools/hf_to_mcore.py) is usable directly; `model.x=` still wins."""
    from gift_megatron.config import ModelConfig, apply_model_preset
    from gift_megatron.megatron.conversion import write_preset

    preset = tmp_path / "model.yaml"
    write_preset(ModelConfig(name="converted", num_layers=3, hidden_size=256, kv_channels=64, vocab_size=500,
                             untie_embeddings_and_output_weights=False, hf_path="/ckpt/m/hf"), preset)
    overrides = [f"model_preset={preset}", "model.num_layers=4"]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(apply_model_preset(compose("config", overrides=overrides), overrides))
    m = cfg.model
    assert (m.name, m.num_layers, m.hidden_size, m.vocab_size, m.untie_embeddings_and_output_weights) == (
        "converted", 4, 256, 500, False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        missing = compose("config", overrides=["model_preset=/nowhere/model.yaml"])
    with pytest.raises(ValueError, match="model_preset=/nowhere/model.yaml: no such file"):
        apply_model_preset(missing, [])


def test_hf_math_experiment_takes_the_converted_models_tokenizer():
    cfg = compose_config("experiment=hf_math", "data.path=/d.jsonl", "model.hf_path=/ckpt/m/hf",
                         "model.max_position_embeddings=2048")
    assert cfg.data.tokenizer == "/ckpt/m/hf" and cfg.data.use_chat_template and cfg.data.num_eval_prompts == 0
    assert cfg.rollout.max_new_tokens >= 256 and cfg.parallel.micro_batch_size == cfg.algo.group_size


def _numeric_fields(schema, prefix: str = ""):
    import dataclasses
    import typing

    for f in dataclasses.fields(schema):
        kind = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _numeric_fields(kind, f"{prefix}{f.name}.")
        elif {int, float} & set(typing.get_args(kind) or (kind,)) and kind is not bool:
            yield f"{prefix}{f.name}"


NUMERIC = list(_numeric_fields(Config))


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_field_rejects_a_negative_value_before_anything_runs(name):
    """Adversarial sweep over the schema itself: a field added without a range check fails here.
    (Zero is legal for some: 0 = off, e.g. kl_coef, verify_every; the cases above pin those that
    must be > 0.)"""
    cfg = OmegaConf.structured(Config)
    OmegaConf.update(cfg, name, -1, merge=False)
    with pytest.raises(ValueError, match=rf"{name.split('.')[-1]}=-1"):
        to_config(cfg)


def test_the_sweep_covers_the_schema():
    assert len(NUMERIC) > 60 and {"optim.adam_beta2", "rollout.base_port", "model.norm_epsilon", "seed"} <= set(NUMERIC)


@pytest.mark.parametrize("override, message", [
    ("model.ffn_hidden_size=0", "model.ffn_hidden_size=0 must be > 0"),
    ("model.norm_epsilon=0", "model.norm_epsilon=0.0 must be > 0"),
    ("algo.z_scale=0", "algo.z_scale=0.0 must be > 0"),
    ("algo.max_sampling_rounds=0", "algo.max_sampling_rounds=0 must be > 0"),
    ("optim.adam_beta2=1.0", r"optim.adam_beta2=1.0 must be in \[0, 1\)"),
    ("optim.adam_eps=0", "optim.adam_eps=0.0 must be > 0"),
    ("rollout.base_port=70000", r"rollout.base_port=70000 must be in \[1, 65535\]"),
    ("rollout.gpu_memory_utilization=0", r"rollout.gpu_memory_utilization=0.0 must be in \(0, 1\]"),
    ("data.warmup_target_accuracy=1.5", r"data.warmup_target_accuracy=1.5 must be in \[0, 1\]"),
    ("data.warmup_batch_size=0", "data.warmup_batch_size=0 must be > 0"),
])
def test_zero_and_out_of_range_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        compose_config(override)


def _float_fields(schema, prefix: str = ""):
    """Every float field (`float` or `float | None`) of the schema by its key, walking nested dataclasses and
    lists of them (`reward.terms[].weight`): a field added later is swept without listing it."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        if dataclasses.is_dataclass(kind):
            yield from _float_fields(kind, f"{prefix}{f.name}.")
        elif typing.get_origin(kind) is list and args and dataclasses.is_dataclass(args[0]):
            yield from _float_fields(args[0], f"{prefix}{f.name}[].")
        elif float in (args or (kind,)):
            yield f"{prefix}{f.name}"


FLOATS = list(_float_fields(Config))


def _override(key: str, value: str) -> str:
    """The command-line override that sets `key` (`a.b`, or `a.items[].b` as a one-item list) to value."""
    if "[]." not in key:
        return f"{key}={value}"
    items, field_name = key.split("[].")
    return f"{items}=[{{{field_name}:{value}}}]"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOATS)
def test_every_float_field_rejects_non_finite_values_naming_the_key(key, value):
    """Through Hydra composition, as `gift-train` gets them: nan used to pass every `value <= 0` check and
    inf every `> 0` one, to fail later (AdamW, NaN losses) without naming the key."""
    with pytest.raises(ValueError) as err:
        compose_config(_override(key, value))
    assert f"{key}={value} must be finite" in str(err.value), str(err.value)


def test_the_float_sweep_covers_the_schema():
    assert len(FLOATS) > 25, FLOATS
    assert {"optim.lr", "optim.adam_beta1", "rollout.max_logprob_mismatch", "reward.terms[].weight",
            "algo.tis_cap", "data.warmup_lr", "model.norm_epsilon"} <= set(FLOATS)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr=inf must be finite"),
    ("optim.lr=nan", "optim.lr=nan must be finite"),
    ("optim.adam_beta1=1.0", r"optim.adam_beta1=1.0 must be in \[0, 1\)"),
    ("algo.clip_ratio_low=1.0", r"algo.clip_ratio_low=1.0 must be < 1"),
    ("reward.terms=[{kind:exact,weight:inf}]", r"reward.terms\[\].weight=inf must be finite"),
])
def test_non_finite_and_out_of_range_floats_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        compose_config(override)


def test_range_checks_are_nan_safe():
    """NaN compares false both ways: the checks must be written so that false means "reject"."""
    from gift_megatron.config import _non_negative, _positive, _within

    nan = float("nan")
    for check in (lambda: _positive("s", x=nan), lambda: _non_negative("s", x=nan),
                  lambda: _within("s", "x", nan, 0, 1)):
        with pytest.raises(ValueError, match="s.x=nan"):
            check()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algo_config_constructs_with_its_defaults_for_every_algorithm(name):
    """The schema is the one source of defaults: `AlgoConfig(name=x)` is what `algo=x` composes (the YAML
    groups carry only the name), and each algorithm gets its own clips, aggregation and reference refresh."""
    algo = AlgoConfig(name=name)
    assert algo == compose_config(f"algo={name}").algo
    assert OmegaConf.load(CONF / "algo" / f"{name}.yaml") == {"name": name}
    want = {"gift": (0.2, 0.2, "seq-mean-token-mean", 20), "grpo": (0.2, 0.2, "seq-mean-token-mean", 0),
            "dapo": (0.2, 0.28, "token-mean", 0), "gspo": (3e-4, 4e-4, "seq-mean-token-mean", 0)}[name]
    assert (algo.clip_ratio_low, algo.clip_ratio_high, algo.loss_agg_mode, algo.reference_refresh_every) == want
    assert (algo.dynamic_sampling, algo.overlong_buffer_length) == ((True, 2) if name == "dapo" else (False, 0))
    assert algo.gift_options == GiftOptions()  # GIFT's defaults: one frozen object, the loss's own


def test_an_explicit_value_wins_over_the_algorithms_default():
    assert compose_config("algo=dapo", "algo.clip_ratio_high=0.3").algo.clip_ratio_high == 0.3
    assert AlgoConfig(name="gspo", clip_ratio_low=0.1).clip_ratio_low == 0.1
    with pytest.raises(ValueError, match="algo.reference_refresh_every=20 but algo grpo uses no reference"):
        compose_config("algo=grpo", "algo.reference_refresh_every=20")


def test_the_renamed_baseline_names_its_new_name():
    with pytest.raises(ValueError, match="algo.baseline=old is now algo.baseline=proximal"):
        compose_config("algo.baseline=old")
    assert compose_config("algo.baseline=proximal").algo.needs_proximal_logprobs
