"""Memory: log-probs on a 50k-vocabulary model, gradient checkpointing, and ZeRO-3 weight gathering.

completion_logprobs never holds logits for the prompt positions, nor a full fp32 log-softmax, so its peak
does not grow with vocabulary x full sequence. Peak memory here is counted exactly: the bytes of every
tensor storage that an aten op creates, alive at once (a dispatch mode sees each op's outputs; a weakref on
each storage sees it freed). Unlike the process's peak resident set, this does not move with the allocator,
library pages or other tests. The naive computation (all logits, one log-softmax) is measured the same
way, to show the bound is a real one."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from toy_batches import toy_batch
from transformers import LlamaConfig, LlamaForCausalLM

import common
import data

B, P, C, V = 4, 1024, 16, 50_000  # full logits: B x (P + C) x V x 4 bytes = 793 MiB; kept ones: 12 MiB


class PeakTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage created inside the block and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _freed(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live:  # views share their base's storage
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._freed, key)
        return out


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_logprob_peak_memory_does_not_scale_with_vocab_times_sequence(backward):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config)
    prompt, completion = torch.randint(0, V, (B, P)), torch.randint(0, V, (B, C))

    def naive():
        logits = model(input_ids=torch.cat([prompt, completion], 1)).logits[:, P - 1 : -1]
        return F.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1)

    def ours():
        return common.completion_logprobs(model, prompt, completion, V)  # V: a pad id no token uses

    peaks, sums = {}, {}
    for fn in (naive, ours):
        with torch.set_grad_enabled(backward), PeakTensorBytes() as memory:
            logprobs = fn()
            if backward:
                logprobs.sum().backward()
        peaks[fn.__name__], sums[fn.__name__] = memory.peak / 2**20, logprobs.sum().item()
        model.zero_grad(set_to_none=True)
    assert sums["ours"] == pytest.approx(sums["naive"], rel=1e-4)  # the same numbers
    full_logits_mb = B * (P + C) * V * 4 / 2**20
    assert peaks["naive"] > full_logits_mb, peaks  # the naive path does pay for them
    assert peaks["ours"] < 0.1 * full_logits_mb, peaks  # ours stays near B x C x V


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
