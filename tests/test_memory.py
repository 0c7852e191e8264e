"""Memory: log-probs on a 50k-vocabulary model, gradient checkpointing, and ZeRO-3 weight gathering.

completion_logprobs never holds logits for the prompt positions, nor a full fp32 log-softmax, so its peak
does not grow with vocabulary x full sequence. Each measurement runs in a fresh process: the peak resident
set (ru_maxrss) of one call, minus the peak before it. The naive computation (all logits, one
log-softmax) is measured the same way, to show the bound is a real one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_batches import toy_batch

import common
import data

ROOT = Path(__file__).resolve().parents[1]
B, P, C, V = 4, 1024, 16, 50_000  # full logits: B x (P + C) x V x 4 bytes = 832 MB; kept ones: 14 MB

PROBE = """
import json, resource, sys, torch, torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, {root!r})
import common
torch.manual_seed(0)
torch.set_num_threads(1)
model = LlamaForCausalLM(LlamaConfig(vocab_size={V}, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=2048))
pad = {V}
prompt = torch.randint(0, {V}, ({B}, {P}))
completion = torch.randint(0, {V}, ({B}, {C}))

def naive():
    logits = model(input_ids=torch.cat([prompt, completion], 1)).logits[:, {P} - 1 : -1]
    return F.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1)

def ours():
    return common.completion_logprobs(model, prompt, completion, pad)

fn = {{"naive": naive, "ours": ours}}[sys.argv[1]]
with torch.no_grad():
    common.completion_logprobs(model, prompt[:, -8:], completion, pad)  # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_mb": (after - before) / 1024, "sum": out.sum().item()}}))
"""


def measure(kind: str) -> dict:
    code = PROBE.format(root=str(ROOT), B=B, P=P, C=C, V=V)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_logprob_peak_memory_does_not_scale_with_vocab_times_sequence():
    ours, naive = measure("ours"), measure("naive")
    assert ours["sum"] == pytest.approx(naive["sum"], rel=1e-4)  # the same numbers
    full_logits_mb = B * (P + C) * V * 4 / 2**20
    assert naive["peak_mb"] > 0.8 * full_logits_mb, naive  # the naive path does pay for them
    assert ours["peak_mb"] < 0.15 * full_logits_mb, ours  # ours stays near B x C x V


def test_gradient_checkpointing_gives_the_same_gradients(toy_cache):
    tokenizer = data.load_tokenizer("toy-sft")
    prompt, completion = toy_batch(tokenizer)
    grads = []
    for on in (False, True):
        model = common.trainable(common.load_model("toy-sft"), type("A", (), {"gradient_checkpointing": on})())
        model.train()
        common.completion_logprobs(model, prompt, completion, tokenizer.pad_token_id).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert getattr(model, "is_activation_checkpointing", None) in (on, None)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == on
        common.generate(model, prompt, tokenizer, 4, 1.0)
        assert model.training  # generate() switches to eval mode (and the KV cache) and back
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_generation_under_zero3_gathers_the_weights_once(toy_cache, monkeypatch):
    """Under ZeRO-3 each layer's weights are sharded; generate() gathers all of them once for the whole
    call, not at every new token (DeepSpeed stood in for: the real one runs in test_deepspeed.py)."""
    import sys
    import types

    entered = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            self.params = params

        def __enter__(self):
            entered.append(len(self.params))

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(common, "zero_stage", lambda: 3)
    tokenizer = data.load_tokenizer("toy-sft")
    model = common.load_model("toy-sft")
    prompt, _ = toy_batch(tokenizer)
    common.generate(model, prompt, tokenizer, max_new_tokens=6, temperature=1.0)
    assert entered == [len(list(model.parameters()))]
