"""Decoders: jft against PyTorch/transformers on this CPU, and loading a model onto a mesh.

    python benchmarks/decoder.py           # train step (full, LoRA) and KV-cache decoding
    python benchmarks/decoder.py --load    # peak host memory of from_pretrained onto a mesh
    python benchmarks/decoder.py --quick   # smaller model and fewer steps (a smoke run)

Train step and decoding: one Llama config (about 21 M parameters: vocabulary
8192, hidden 512, 4 layers of 8 heads, MLP 1376, untied head), float32, batch
8 x 128 tokens, AdamW; jft's :class:`jft.models.llama.Llama` with
``jft.train.make_train_step`` against ``transformers.LlamaForCausalLM``
(``attn_implementation="eager"``) with ``torch.optim.AdamW``; LoRA r=8 on the
query and value projections by ``jft.peft`` and by ``peft``. Each case runs in
its own subprocess: after a warm-up (jft: compile and one step; torch: two
steps) the peak-RSS counter is reset and the median of the timed steps gives
tokens/s; "peak" is the peak RSS during the timed steps above the RSS before
the model was built (parameters, optimizer state, gradients and activations).
Decoding: 4 prompts of 32 tokens continued greedily by 64 tokens with a KV
cache, ``jft.models.generate.generate`` (after one call that compiles) against
``model.generate``; new tokens per second.

``--load``: a Llama folder of random float32 weights (about 134 M parameters,
512 MiB) is read by ``jft.weights.from_pretrained`` onto one device, onto 8
fake CPU devices with FSDP, and onto a 2 x 4 (data, model) mesh with tensor
parallelism; each in a fresh subprocess whose peak-RSS counter is reset just
before the call. On a CPU every device's shard lives in host memory, so the
placed arrays themselves count (each distinct buffer once: a shard replicated
over several CPU devices may share one); "transient" is the peak above them,
which the shard-by-shard reader keeps under one shard of the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
)  # fmt: skip
QUICK = dict(CONFIG, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
BATCH, SEQ = 8, 128
PROMPTS, PROMPT_LEN, NEW = 4, 32, 64
LOAD_CONFIG = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False,
)  # fmt: skip

_PRELUDE = textwrap.dedent(
    """
    import ctypes, json, os, statistics, sys, time
    sys.path.insert(0, ROOT)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    def reset_peak():
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    """
)

_JFT_TRAIN = """
import jax, jax.numpy as jnp, numpy as np
import jft, jft.peft
from jft.train import losses
c = CONFIG
base = rss()
model = jft.models.get("llama", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
    num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
    num_kv_heads=c["num_key_value_heads"], intermediate_size=c["intermediate_size"])
ids = np.random.default_rng(0).integers(0, c["vocab_size"], (BATCH, SEQ)).astype(np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
variables = jax.jit(model.init)(jax.random.key(0), ids[:1, :8])
adamw = jft.optim.adamw(1e-4, weight_decay=0.0)
if VARIANT == "lora":
    config = jft.peft.LoraConfig(targets=(r"backbone/layers_\\d+/attention/(q_proj|v_proj)",),
                                 rank=8, alpha=16)
    model = jft.peft.lora(model, config)
    variables = jft.peft.init_adapters(model, variables, ids[:1, :8])
    rules = jft.peft.adapter_rules(adamw)
else:
    rules = [(".*", adamw)]
state = jft.train.create_train_state(variables, rules)
del variables
step = jft.train.make_train_step(model, rules, losses.get("causal_lm_xent", label_smoothing=0.0))
state, metrics = step(state, batch)
jax.block_until_ready(metrics)
reset_peak()
times = []
for _ in range(STEPS):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": statistics.median(times), "peak": hwm() - base,
                  "loss": float(metrics["loss"])}))
"""

_TORCH_TRAIN = """
from tests.torch_refs import import_timm
import_timm()  # transformers and peft import torchvision, which needs this on CPU torch
import torch, transformers
c = CONFIG
base = rss()
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(**c, attn_implementation="eager")).train()
if VARIANT == "lora":
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                        weight_decay=0.0)
ids = torch.randint(0, c["vocab_size"], (BATCH, SEQ))

def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

for _ in range(2):
    step()
reset_peak()
times = []
for _ in range(STEPS):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": statistics.median(times), "peak": hwm() - base,
                  "loss": float(loss)}))
"""

_JFT_DECODE = """
import jax, jax.numpy as jnp, numpy as np
import jft
from jft.models import generate as gen
c = CONFIG
model = jft.models.get("llama", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
    num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
    num_kv_heads=c["num_key_value_heads"], intermediate_size=c["intermediate_size"])
ids = np.random.default_rng(0).integers(3, c["vocab_size"], (PROMPTS, PROMPT_LEN)).astype(np.int32)
variables = jax.jit(model.init)(jax.random.key(0), ids[:1, :8])
jax.block_until_ready(gen.generate(model, variables, ids, max_new_tokens=NEW))
t0 = time.perf_counter()
out = jax.block_until_ready(gen.generate(model, variables, ids, max_new_tokens=NEW))
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": int(out.size)}))
"""

_TORCH_DECODE = """
from tests.torch_refs import import_timm
import_timm()
import torch, transformers
c = CONFIG
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(**c, attn_implementation="eager")).eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
ids = torch.randint(3, c["vocab_size"], (PROMPTS, PROMPT_LEN))
kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True)
with torch.inference_mode():
    model.generate(ids, **kw)
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": int(out[:, PROMPT_LEN:].numel())}))
"""

_JFT_LOAD = """
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jft.weights import from_pretrained, sharding
devices = np.asarray(jax.devices())
if LAYOUT == "one device":
    kw = {}
elif LAYOUT == "FSDP, 8 devices":
    kw = {"mesh": jax.sharding.Mesh(devices, ("data",))}
else:
    rules = tuple((p, jax.P("data", *s[1:]) if s and s[0] is None else s)
                  for p, s in sharding.LLAMA_TENSOR_PARALLEL)
    kw = {"mesh": jax.sharding.Mesh(devices.reshape(2, 4), ("data", "model")),
          "sharding_rules": rules}
# A first load traces the model and imports what loading needs; the second is measured.
jax.block_until_ready(from_pretrained(FOLDER, **kw)[1])
import gc; gc.collect()
reset_peak()
base = rss()
model, variables = from_pretrained(FOLDER, **kw)
jax.block_until_ready(variables)
peak = hwm() - base
leaves = jax.tree.leaves(variables)
# Distinct buffers: on a CPU a shard put on several devices may be one host buffer.
placed = sum({s.data.unsafe_buffer_pointer(): s.data.nbytes
              for x in leaves for s in x.addressable_shards}.values())
shard = max(max(s.data.nbytes for s in x.addressable_shards) for x in leaves)
print(json.dumps({"peak": peak, "placed": placed, "largest_shard": shard,
                  "model": sum(x.nbytes for x in leaves),
                  "largest_tensor": max(x.nbytes for x in leaves)}))
"""


def _run(script: str, **consts) -> dict:
    head = "".join(f"{k} = {v!r}\n" for k, v in {"ROOT": ROOT, **consts}.items())
    code = head + _PRELUDE + script
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if out.returncode:
        raise RuntimeError(f"benchmark subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def train_and_decode(quick: bool) -> None:
    config = QUICK if quick else CONFIG
    steps = 2 if quick else 5
    consts = dict(CONFIG=config, BATCH=BATCH, SEQ=SEQ, STEPS=steps)
    params = _param_count(config)
    print(f"Llama {params / 1e6:.1f} M parameters, float32, batch {BATCH} x {SEQ}, CPU")
    print()
    print("| case | jft tokens/s | torch tokens/s | jft / torch | jft peak | torch peak | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in ("full", "lora"):
        j = _run(_JFT_TRAIN, VARIANT=variant, **consts)
        t = _run(_TORCH_TRAIN, VARIANT=variant, **consts)
        jt, tt = BATCH * SEQ / j["step_s"], BATCH * SEQ / t["step_s"]
        name = "train step, full" if variant == "full" else "train step, LoRA r=8 (q, v)"
        print(
            f"| {name} | {jt:,.0f} | {tt:,.0f} | {jt / tt:.2f}x | {_mib(j['peak'])} "
            f"| {_mib(t['peak'])} | {j['peak'] / t['peak']:.2f}x |"
        )
    consts = dict(CONFIG=config, PROMPTS=PROMPTS, PROMPT_LEN=PROMPT_LEN, NEW=NEW)
    j, t = _run(_JFT_DECODE, **consts), _run(_TORCH_DECODE, **consts)
    jt, tt = j["tokens"] / j["seconds"], t["tokens"] / t["seconds"]
    print(
        f"| greedy decode, KV cache, {PROMPTS} x ({PROMPT_LEN} + {NEW}) | {jt:,.0f} | {tt:,.0f} "
        f"| {jt / tt:.2f}x | | | |"
    )


def _param_count(c: dict) -> int:
    h, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    return 2 * v * h + h + n * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h)


def _write_folder(folder: str, c: dict) -> None:
    """A Llama folder of random float32 weights, written tensor by tensor (no torch)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            **{p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"},
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })  # fmt: skip
    tensors = {k: rng.standard_normal(s, np.float32) * 0.02 for k, s in shapes.items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump({"model_type": "llama", **c}, fh)


def load(quick: bool) -> None:
    config = QUICK if quick else LOAD_CONFIG
    with tempfile.TemporaryDirectory() as folder:
        _write_folder(folder, config)
        print(f"Llama {_param_count(config) / 1e6:.0f} M parameters, float32 safetensors, CPU")
        print()
        print(
            "| layout | model | largest tensor | largest shard | placed arrays | peak RSS "
            "| transient (peak - placed) | transient / largest shard |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for layout in ("one device", "FSDP, 8 devices", "FSDP x tensor parallel, 2 x 4"):
            r = _run(_JFT_LOAD, FOLDER=folder, LAYOUT=layout)
            transient = r["peak"] - r["placed"]
            print(
                f"| {layout} | {_mib(r['model'])} | {_mib(r['largest_tensor'])} "
                f"| {_mib(r['largest_shard'])} | {_mib(r['placed'])} | {_mib(r['peak'])} "
                f"| {_mib(transient)} | {transient / r['largest_shard']:.1f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--load", action="store_true", help="measure loading onto a mesh")
    parser.add_argument("--quick", action="store_true", help="a small model, few steps")
    args = parser.parse_args()
    load(args.quick) if args.load else train_and_decode(args.quick)


if __name__ == "__main__":
    main()
