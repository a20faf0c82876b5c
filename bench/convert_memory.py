"""Peak memory of tools/hf_to_mcore.py (streaming) vs a load-everything conversion, side by side.

Writes a random Llama-style HF checkpoint (default ~191M parameters, fp32, sharded safetensors),
then measures, each in a fresh process, the peak anonymous memory above the import baseline of:
  streaming: tools/hf_to_mcore.py (one tensor at a time into a dist checkpoint)
  load-all:  every safetensors shard loaded and every tensor converted in memory (what a naive
             converter holds before writing)
and prints them next to the checkpoint size and its largest tensor.

Run: python bench/convert_memory.py [--hidden 1024 --layers 8 --ffn 4096 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gift_megatron.convert.safetensors_io import HFWriter  # noqa: E402

# Peak anonymous memory (RssAnon: the process's own allocations; file pages that safetensors maps
# are page cache the kernel can drop, so VmRSS would overstate), sampled every 5 ms by a thread.
SAMPLER = """
import re, threading, time
_peak = [0]
def _sample():
    while True:
        kb = int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        _peak[0] = max(_peak[0], kb)
        time.sleep(0.005)
threading.Thread(target=_sample, daemon=True).start()
"""
PEAK = "time.sleep(0.02); print('PEAK', _peak[0] / 1024)"
BASELINE = SAMPLER + "import gift_megatron.megatron.conversion\n" + PEAK
STREAMING = SAMPLER + """
import sys
from gift_megatron.megatron.conversion import hf_to_mcore
hf_to_mcore(sys.argv[1], sys.argv[2], progress=False)
""" + PEAK
LOAD_ALL = SAMPLER + """
import sys, torch
from gift_megatron.convert.hf_config import model_config_from_hf
from gift_megatron.convert.mapping import ModelMapping
from gift_megatron.convert.safetensors_io import HFReader
import gift_megatron.megatron.conversion
d = sys.argv[1]
m = model_config_from_hf(d); mp = ModelMapping.from_config(m, m.vocab_size); r = HFReader(d)
hf = {n: r.get(n).clone() for n in r.names()}  # in memory, as from_pretrained + state_dict() holds it
full = {name: mp.to_mcore(name, [hf[h] for h in rule.hf]) for name, rule in mp.rules.items()}
""" + PEAK


def write_model(folder: Path, hidden: int, layers: int, ffn: int, vocab: int, heads: int, kv_heads: int) -> tuple:
    d = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                       f"{p}.self_attn.q_proj.weight": (heads * d, hidden), f"{p}.self_attn.k_proj.weight":
                       (kv_heads * d, hidden), f"{p}.self_attn.v_proj.weight": (kv_heads * d, hidden),
                       f"{p}.self_attn.o_proj.weight": (hidden, heads * d), f"{p}.mlp.gate_proj.weight": (ffn, hidden),
                       f"{p}.mlp.up_proj.weight": (ffn, hidden), f"{p}.mlp.down_proj.weight": (hidden, ffn)})
    writer = HFWriter(folder, max_shard_bytes=256 * 2**20)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape) * 0.02)
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": ffn,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    sizes = [4 * torch.Size(s).numel() for s in shapes.values()]
    return sum(sizes) / 2**20, max(sizes) / 2**20, sum(sizes) // 4


def _peak(cmd: list[str]) -> float:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return float(re.findall(r"PEAK ([\d.]+)", out)[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        total, largest, params = write_model(hf, a.hidden, a.layers, a.ffn, a.vocab, heads=16, kv_heads=8)
        base = _peak([sys.executable, "-c", BASELINE])
        streaming = _peak([sys.executable, "-c", STREAMING, str(hf), str(Path(tmp) / "mc")]) - base
        load_all = _peak([sys.executable, "-c", LOAD_ALL, str(hf)]) - base
    print(f"checkpoint: {params / 1e6:.0f}M parameters, {total:.0f} MiB fp32, largest tensor {largest:.0f} MiB")
    print("conversion | peak MiB above imports | x largest tensor | x checkpoint")
    for name, peak in (("streaming (hf_to_mcore.py)", streaming), ("load everything", load_all)):
        print(f"{name} | {peak:.0f} | {peak / largest:.1f} | {peak / total:.2f}")
    print(f"streaming / load-everything peak: {streaming / load_all:.2f}")


if __name__ == "__main__":
    main()
