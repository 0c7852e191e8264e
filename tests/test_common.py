"""Tests of the shared plumbing (common.py): hand-computed values, the parity patterns (log-probs vs the HF
loss, left-padded batches vs one sequence at a time on GPT-2, GPT-NeoX and Llama),
the pad-token rules, tokenization, generation, data loading, run outputs and evaluation.

The models are tiny and randomly initialized (vocabulary 50, hidden 32, 2 layers, dropout 0), so every
test but the torchrun one runs in well under a second. Tests whose docstring starts with "Regression" guard
a defect that common.py once had; each names it."""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

import common
import data
import toy
import training

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Tiny random models (GPT-2: learned absolute positions; GPT-NeoX: rotary; Llama: rotary)
# ---------------------------------------------------------------------------------------------

V, BOS, EOS = 50, 1, 2  # vocabulary of the tiny models; id 0 is a pad inside the vocabulary (a real token)
PAD_OUT = V  # a pad id outside the embedding, as load_tokenizer adds to a tokenizer without one (and as the toy's)
ARCHS = ["gpt2", "gpt_neox", "llama"]


def tiny_config(arch: str, **overrides):
    """Hidden 32, 2 layers, 4 heads, dropout 0; `overrides` replace any of these."""
    kwargs = {
        "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            attention_dropout=0.0,
            hidden_dropout=0.0,
        ),
        "llama": dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            attention_dropout=0.0,
        ),
    }[arch]
    kwargs.update(vocab_size=V, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0, **overrides)
    return {"gpt2": GPT2Config, "gpt_neox": GPTNeoXConfig, "llama": LlamaConfig}[arch](**kwargs)


def tiny_lm(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def tiny_rm(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=1)).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores of order 1, so that a wrong index shows
    return model


def stub_tokenizer(pad_id: int = PAD_OUT):
    """All that generate() needs from a tokenizer."""
    return SimpleNamespace(pad_token_id=pad_id, eos_token_id=EOS, bos_token_id=BOS)


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """BOS + 1..9 random ordinary tokens (never pad, BOS or EOS)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (n,), generator=g).tolist()
    return [[BOS] + torch.randint(3, V, (k,), generator=g).tolist() for k in lengths]


# three prompts of different lengths; completions with EOS, with EOS and shorter, and without EOS
PROMPTS = [[BOS, 5, 6, 7, 8, 9, 10], [BOS, 11, 12], [BOS, 13, 14, 15, 16]]
COMPLETIONS = [[20, 21, EOS], [22, EOS], [23, 24, 25, 26]]


# ---------------------------------------------------------------------------------------------
# Masked statistics (hand-computed values)
# ---------------------------------------------------------------------------------------------


def test_masked_mean_var_whiten_hand_values():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 1, 1, 0])
    assert common.masked_mean(x, mask).item() == pytest.approx(2.5)
    assert common.masked_var(x, mask).item() == pytest.approx(0.5)  # unbiased: ((-.5)^2 + .5^2) / 1
    assert common.masked_var(x, mask, unbiased=False).item() == pytest.approx(0.25)
    white = common.masked_whiten(x, mask)
    assert white[1:3].tolist() == pytest.approx([-0.70711, 0.70711], abs=1e-5)
    kept_mean = common.masked_whiten(x, mask, shift_mean=False)
    assert kept_mean[1:3].tolist() == pytest.approx([2.5 - 0.70711, 2.5 + 0.70711], abs=1e-5)


def test_masked_mean_of_a_fully_masked_row_is_zero_not_nan():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0, -3.0, -4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    assert common.masked_mean(logps, mask, dim=1).tolist() == [-2.0, 0.0]
    assert common.masked_mean(logps, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), dim=1).tolist() == [-1.5, 0.0]
    assert common.masked_mean(logps, torch.zeros(2, 4)).item() == 0.0
    assert common.masked_var(torch.tensor([3.0, 5.0]), torch.tensor([1, 0])).item() == 0.0  # one value: no NaN


# ---------------------------------------------------------------------------------------------
# Padding, EOS truncation, score index, missing-EOS rule
# ---------------------------------------------------------------------------------------------


def test_pad_left_and_right():
    assert data.pad([[1, 2, 3], [4, 5]], 0, "left").tolist() == [[1, 2, 3], [0, 4, 5]]
    assert data.pad([[1, 2, 3], [4, 5]], 0, "right").tolist() == [[1, 2, 3], [4, 5, 0]]
    assert data.pad([[1], [2, 3]], 9, "left").dtype == torch.long


def test_truncate_after_eos():
    E, P = 99, 0
    out, has_eos = common.truncate_after_eos(torch.tensor([[5, 9, E, 7, 3], [5, 9, 7, 3, 2], [E, 4, E, 6, 7]]), E, P)
    assert out.tolist() == [[5, 9, E, P, P], [5, 9, 7, 3, 2], [E, P, P, P, P]]
    assert has_eos.tolist() == [True, False, True]


def test_eos_at_the_window_edge_counts_as_eos():
    # 53 generated tokens, EOS the 53rd: it has EOS (the old "contains a pad" test would say it has not)
    E, P = 99, 0
    window = torch.tensor([[5] * 52 + [E]])
    out, has_eos = common.truncate_after_eos(window, E, P)
    assert torch.equal(out, window) and has_eos.tolist() == [True]
    assert not (window == P).any()  # what the old code tested


def test_reward_scores_missing_eos_rule_and_bias():
    rm = tiny_rm()
    prompt, completion = data.pad(PROMPTS[:2], 0, "left"), data.pad(COMPLETIONS[:2], 0, "right")
    with torch.no_grad():
        raw = common.reward_scores(rm, prompt, completion, 0)
        rm.config.reward_bias = raw[0].item() - 0.7  # normalized score of row 0 becomes 0.7
        normalized = common.reward_scores(rm, prompt, completion, 0)
        has_eos = torch.tensor([False, True])  # pretend row 0 (normalized score 0.7) has no EOS
        replaced = common.reward_scores(rm, prompt, completion, 0, has_eos=has_eos, no_eos_score=-1.0)
    assert normalized[0].item() == pytest.approx(0.7, abs=1e-6)
    assert torch.allclose(normalized, raw - rm.config.reward_bias)
    # N+ rule: a completion without EOS gets -1 instead of its score (0.7 -> -1), the others are untouched
    assert replaced.tolist() == pytest.approx([-1.0, normalized[1].item()])
    # without a no_eos_score nothing is replaced
    with torch.no_grad():
        assert torch.equal(common.reward_scores(rm, prompt, completion, 0, has_eos=has_eos), normalized)


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_score_is_read_at_the_eos(arch):
    """Oracle: HF's own sequence-classification head on the unpadded sequence, which pools its last token
    (the EOS, or the last completion token when there is none)."""
    rm = tiny_rm(arch)
    prompt, completion = data.pad(PROMPTS, 0, "left"), data.pad(COMPLETIONS, 0, "right")
    with torch.no_grad():
        scores = common.reward_scores(rm, prompt, completion, 0)
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            hf = rm(input_ids=torch.tensor([p + c])).logits[0, 0]
            assert scores[i].item() == pytest.approx(hf.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Log-probs: vs the HF loss, vs a full log-softmax, batched vs one at a time
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_completion_logprobs_equal_the_hf_loss(arch):
    """At temperature 1: sum of per-token log-probs = -loss * n_tokens, labels -100 on the prompt."""
    model = tiny_lm(arch)
    for p, c in zip(PROMPTS, COMPLETIONS):
        with torch.no_grad():
            logps = common.completion_logprobs(model, torch.tensor([p]), torch.tensor([c]), pad_id=PAD_OUT)
            loss = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss
        assert logps.sum().item() == pytest.approx(-loss.item() * len(c), abs=1e-4)


def test_in_vocabulary_pad_is_excluded_from_the_scored_distribution():
    """generate() never samples a pad id that lies inside the vocabulary, so completion_logprobs scores the
    renormalized distribution without it: log p'(y) = log p(y) - log(1 - p(pad)), where log p(y) is what
    transformers' own loss (and TRL) computes."""
    model = tiny_lm("llama")
    p, c = torch.tensor([PROMPTS[0]]), torch.tensor([COMPLETIONS[0]])
    with torch.no_grad():
        with_pad = common.completion_logprobs(model, p, c, pad_id=0)
        without = common.completion_logprobs(model, p, c, pad_id=PAD_OUT)
        logits = common.forward(model, torch.cat([p, c], 1), PAD_OUT).logits[0, p.shape[1] - 1 : -1]
        loss = model(input_ids=torch.cat([p, c], 1), labels=torch.cat([torch.full_like(p, -100), c], 1)).loss
    p_pad = torch.softmax(logits, -1)[:, 0]
    torch.testing.assert_close(with_pad[0], without[0] - torch.log1p(-p_pad), rtol=0, atol=1e-5)
    shift = -torch.log1p(-p_pad).sum().item()  # the renormalization, summed over the sequence
    assert with_pad.sum().item() == pytest.approx(-loss.item() * c.shape[1] + shift, abs=1e-5) and shift > 1e-3


def test_completion_logprobs_equal_full_log_softmax_at_temperature():
    T = 0.7
    model = tiny_lm("llama")
    prompt, completion = data.pad(PROMPTS, PAD_OUT, "left"), data.pad(COMPLETIONS, PAD_OUT, "right")
    with torch.no_grad():
        logps, entropy = common.completion_logprobs(
            model, prompt, completion, PAD_OUT, temperature=T, with_entropy=True
        )
        full = common.forward(
            model, torch.cat([prompt, completion], 1), PAD_OUT
        ).logits  # [B, P + C, V], every position
    P = prompt.shape[1]
    for i, c in enumerate(COMPLETIONS):
        for t, token in enumerate(c):
            logp = F.log_softmax(full[i, P - 1 + t] / T, dim=-1)  # position P-1+t predicts completion token t
            assert logps[i, t].item() == pytest.approx(logp[token].item(), abs=1e-5)
            assert entropy[i, t].item() == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-5)
        assert (logps[i, len(c) :] == 0).all() and (entropy[i, len(c) :] == 0).all()  # padding gives 0


@pytest.mark.parametrize("pad_id", [2, 99])
def test_token_logprobs_equal_plain_log_softmax(pad_id):
    """token_logprobs (the log-softmax a few rows at a time under activation checkpointing) against the plain
    computation, log_softmax of (logits / T) with an in-vocabulary pad masked (2) or none (99): the same log-probs
    and entropies and the same gradients of any combination of them; 0 on padding; and a float64 gradcheck."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5, 3))
    targets[targets == pad_id] = 0
    targets[0, 2] = pad_id  # a padded position
    logps, entropy = common.token_logprobs(logits, targets, pad_id, 0.7, with_entropy=True, chunk_rows=2)
    z = (logits / 0.7).masked_fill(torch.arange(7) == pad_id, torch.finfo(torch.float64).min)
    logp = F.log_softmax(z, -1)
    valid = targets != pad_id
    plain = logp.gather(-1, targets.clamp(max=6)[..., None]).squeeze(-1) * valid
    plain_entropy = -(logp.exp() * logp).sum(-1) * valid
    torch.testing.assert_close(logps, plain)
    torch.testing.assert_close(entropy, plain_entropy)
    w = torch.randn(5, 3, dtype=torch.float64)
    ours = torch.autograd.grad((w * logps).sum() + (w * entropy).sum(), logits)[0]
    expected = torch.autograd.grad((w * plain).sum() + (w * plain_entropy).sum(), logits)[0]
    torch.testing.assert_close(ours, expected)
    fn = lambda x: common.token_logprobs(x, targets, pad_id, 0.7, with_entropy=True, chunk_rows=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("pad_id", [0, PAD_OUT])
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_one_at_a_time(arch, pad_id):
    """§4.3: log-probs and reward scores of a left-padded batch equal those of each sequence unpadded (1e-5),
    with a pad inside the vocabulary (toy) or outside the embedding (a pad added to the tokenizer)."""
    lm, rm = tiny_lm(arch), tiny_rm(arch)
    prompt, completion = data.pad(PROMPTS, pad_id, "left"), data.pad(COMPLETIONS, pad_id, "right")
    with torch.no_grad():
        batch_logps = common.completion_logprobs(lm, prompt, completion, pad_id, temperature=0.7)
        batch_scores = common.reward_scores(rm, prompt, completion, pad_id)
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            one_logps = common.completion_logprobs(lm, torch.tensor([p]), torch.tensor([c]), pad_id, temperature=0.7)
            one_score = common.reward_scores(rm, torch.tensor([p]), torch.tensor([c]), pad_id)
            torch.testing.assert_close(batch_logps[i, : len(c)], one_logps[0], atol=1e-5, rtol=0)
            assert batch_scores[i].item() == pytest.approx(one_score.item(), abs=1e-5)


@pytest.mark.parametrize("pad_id", [0, PAD_OUT])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_equals_the_prompt_repeated(arch, pad_id):
    """k = 3 completions per prompt through one prompt forward and a tiled KV cache: the log-probs, entropies,
    reward scores and per-token head outputs of cat([prompt, completion]) computed k times (1e-5), and the
    same gradients."""
    lm, rm = tiny_lm(arch).train(), tiny_rm(arch)
    prompt = data.pad(PROMPTS, pad_id, "left")
    completion = data.pad(
        COMPLETIONS + [[30, EOS], [31, 32, 33, 34, 35, EOS], [EOS]] + COMPLETIONS[::-1], pad_id, "right"
    )
    full = prompt.repeat(3, 1)
    shared, shared_entropy = common.completion_logprobs(
        lm, prompt, completion, pad_id, temperature=0.7, with_entropy=True
    )
    alone, alone_entropy = common.completion_logprobs(lm, full, completion, pad_id, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_entropy, alone_entropy, atol=1e-5, rtol=0)
    grads = []
    for logps in (shared, alone):
        lm.zero_grad()
        logps.sum().backward()
        grads.append([q.grad.clone() for q in lm.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            common.reward_scores(rm, prompt, completion, pad_id),
            common.reward_scores(rm, full, completion, pad_id),
            atol=1e-5,
            rtol=0,
        )
        real = torch.cat([full, completion], 1) != pad_id  # head outputs at padding are arbitrary
        torch.testing.assert_close(
            common.token_scores(rm, prompt, completion, pad_id)[real],
            common.token_scores(rm, full, completion, pad_id)[real],
            atol=1e-5,
            rtol=0,
        )


def test_shared_prompt_forward_computes_the_prompt_once_or_declines():
    """The prompt tokens run once: the first forward sees [B, P], the second only the completions. With
    gradient checkpointing in training mode (no KV cache) or an empty prompt it declines (None), and
    completion_logprobs then repeats the prompt: same values."""
    lm = tiny_lm("llama").train()
    prompt, completion = data.pad(PROMPTS, PAD_OUT, "left"), data.pad(COMPLETIONS * 2, PAD_OUT, "right")
    shapes = []
    hook = lm.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    first, second, order = common.shared_prompt_forward(
        lm, prompt, completion, PAD_OUT, logits_to_keep=completion.shape[1]
    )  # the last C
    assert shapes == [tuple(prompt.shape), tuple(completion.shape)] and order.tolist() == [
        0,
        3,
        1,
        4,
        2,
        5,
    ]  # grouped by prompt
    assert first.logits.shape[1] == 1 and second.logits.shape[:2] == completion.shape
    assert common.shared_prompt_forward(lm, prompt[:, :0], completion, PAD_OUT) is None
    expected = common.completion_logprobs(lm, prompt, completion, PAD_OUT).detach()
    lm.activation_checkpointing_enable({"use_reentrant": False})
    shapes.clear()
    assert common.shared_prompt_forward(lm, prompt, completion, PAD_OUT) is None and shapes == []
    torch.testing.assert_close(common.completion_logprobs(lm, prompt, completion, PAD_OUT), expected, atol=1e-5, rtol=0)
    assert shapes == [(6, prompt.shape[1] + completion.shape[1])]  # the prompt repeated: one full forward
    hook.remove()
    with pytest.raises(ValueError, match="not a multiple"):
        common.completion_logprobs(lm, prompt, completion[:5], PAD_OUT)
    lm.activation_checkpointing_disable() if hasattr(
        lm, "activation_checkpointing_disable"
    ) else lm.gradient_checkpointing_disable()
    one = torch.tensor([[EOS]] * 6)  # one-token completions: only the prompt's last logits are read
    torch.testing.assert_close(
        common.completion_logprobs(lm, prompt, one, PAD_OUT),
        common.completion_logprobs(lm, prompt.repeat(2, 1), one, PAD_OUT),
        atol=1e-5,
        rtol=0,
    )


def test_gpt2_without_position_ids_would_differ():
    """The parity test above is sensitive: with learned absolute positions (GPT-2), left padding without
    position ids shifts every position of the shorter rows."""
    model = tiny_lm("gpt2")
    prompt, completion = data.pad(PROMPTS, 0, "left"), data.pad(COMPLETIONS, 0, "right")
    ids = torch.cat([prompt, completion], 1)
    with torch.no_grad():
        mask = (ids != 0).long()
        logits = model(input_ids=ids, attention_mask=mask).logits  # no position_ids
        p, c = PROMPTS[1], COMPLETIONS[1]  # the most padded row
        unpadded = model(input_ids=torch.tensor([p + c])).logits[0]
        with_positions = common.forward(model, ids, 0).logits
    row = ids[1] != 0
    assert (logits[1][row] - unpadded).abs().max() > 1e-2
    torch.testing.assert_close(with_positions[1][row], unpadded, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Pad token: dedicated, never EOS, never embedded
# ---------------------------------------------------------------------------------------------


def save_toy_tokenizer(path: Path, **special) -> str:
    """The toy vocabulary saved as a plain tokenizer with the given special tokens (e.g. no pad)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=toy.make_tokenizer().backend_tokenizer, **special)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("pad", [None, "<eos>"])
def test_load_tokenizer_adds_a_dedicated_pad(tmp_path, pad):
    special = dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tok = data.load_tokenizer(save_toy_tokenizer(tmp_path, **special, **({"pad_token": pad} if pad else {})))
    assert tok.eos_token_id == 1
    # <|pad|>, which the toy vocabulary already holds (a real tokenizer gets it as a new id): outside the embedding
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("<|pad|>", 45, len(toy.VOCAB))
    assert tok.pad_token_id >= toy.model_config().vocab_size
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_load_tokenizer_keeps_an_existing_distinct_pad(tmp_path):
    tok = data.load_tokenizer(save_toy_tokenizer(tmp_path, bos_token="<bos>", eos_token="<eos>", pad_token="<unk>"))
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (2, 1, 46)
    assert data.load_tokenizer("toy").pad_token_id == 45


def test_load_tokenizer_without_eos_is_a_user_error(tmp_path):
    with pytest.raises(training.UserError, match="no EOS"):
        data.load_tokenizer(save_toy_tokenizer(tmp_path, bos_token="<bos>", pad_token="<|pad|>"))


def test_forward_never_embeds_a_pad_outside_the_embedding(tmp_path):
    """Neither a pad added past the vocabulary (id 46) nor the toy's own pad (id 45) has a row in the toy
    model's 45-row embedding: forward / log-probs / generation work with either, give the same numbers
    with both, and equal each sequence scored alone without any padding."""
    special = dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")  # <pad>: a new id
    tok = data.load_tokenizer(save_toy_tokenizer(tmp_path, **special))
    toy_tok = toy.make_tokenizer()
    new_pad, toy_pad = tok.pad_token_id, toy_tok.pad_token_id
    assert (new_pad, toy_pad) == (46, 45)
    torch.manual_seed(0)
    model = common.load_model("toy-tiny").eval()
    assert model.config.vocab_size == 45
    # "POST: rain cat TL;DR:" -> " rain cat", "POST: rain TL;DR:" -> " rain"
    prompts, completions = [[0, 3, 5, 6, 4], [0, 3, 5, 4]], [[5, 6, 1], [5, 1]]
    ids = data.pad(prompts, new_pad, "left")
    for pad_id in (new_pad, toy_pad):  # what forward() protects against
        with pytest.raises(IndexError):
            model(input_ids=ids.masked_fill(ids == new_pad, pad_id))
    completion = data.pad(completions, new_pad, "right")
    with torch.no_grad():
        logps = common.completion_logprobs(model, ids, completion, new_pad)
        same = common.completion_logprobs(
            model,
            ids.masked_fill(ids == new_pad, toy_pad),
            completion.masked_fill(completion == new_pad, toy_pad),
            toy_pad,
        )
        alone = [
            common.completion_logprobs(model, torch.tensor([p]), torch.tensor([c]), new_pad)[0]
            for p, c in zip(prompts, completions)
        ]
        generated, _ = common.generate(model, ids, tok, max_new_tokens=4, temperature=0.0)
        generated_toy, _ = common.generate(
            model, ids.masked_fill(ids == new_pad, toy_pad), toy_tok, max_new_tokens=4, temperature=0.0
        )
    torch.testing.assert_close(logps, same, atol=1e-6, rtol=0)
    for i, c in enumerate(completions):
        torch.testing.assert_close(logps[i, : len(c)], alone[i], atol=1e-5, rtol=0)
        assert (logps[i, len(c) :] == 0).all()
    assert generated.shape[0] == 2
    assert torch.equal(generated.masked_fill(generated == new_pad, toy_pad), generated_toy)


# ---------------------------------------------------------------------------------------------
# Tokenization of (prompt, completion)
# ---------------------------------------------------------------------------------------------

# toy ids: <bos> 0, <eos> 1, <unk> 2, POST: 3, TL;DR: 4, rain 5, cat 6, very 17, then 18, so 19, maybe 20, <|pad|> 45


def test_tokenize_pair_appends_eos_once():
    tok = toy.make_tokenizer()
    assert data.tokenize_pair(tok, "POST: rain cat TL;DR:", " rain cat", 32, 16) == ([0, 3, 5, 6, 4], [5, 6, 1])
    assert data.tokenize_pair(tok, "POST: rain cat TL;DR:", " rain cat <eos>", 32, 16) == ([0, 3, 5, 6, 4], [5, 6, 1])
    assert data.tokenize_pair(tok, "POST: rain cat TL;DR:", "", 32, 16) == ([0, 3, 5, 6, 4], [1])


def test_tokenize_pair_splits_at_the_common_prefix():
    # "POST: ra" + "in cat" tokenizes as "POST: rain cat": the prompt's last token merges into the
    # completion, so the split is at the common prefix [<bos>, POST:] and BOS is counted once
    tok = toy.make_tokenizer()
    assert tok("POST: ra")["input_ids"] == [0, 3, 2]
    assert data.tokenize_pair(tok, "POST: ra", "in cat", 32, 16) == ([0, 3], [5, 6, 1])


def test_tokenize_pair_truncates_prompt_start_and_completion_end():
    tok = toy.make_tokenizer()
    prompt = "POST: rain very cat then rain so cat maybe TL;DR:"
    assert tok(prompt)["input_ids"] == [0, 3, 5, 17, 6, 18, 5, 19, 6, 20, 4]
    # the prompt keeps BOS + its last 4 tokens ("so cat maybe TL;DR:"); the completion loses its EOS
    assert data.tokenize_pair(tok, prompt, " rain cat", 5, 2) == ([0, 19, 6, 20, 4], [5, 6])
    assert data.truncate_prompt([7, 8, 9, 10], 2, bos_id=1) == [9, 10]  # no BOS to keep
    assert data.truncate_prompt([7, 8, 9, 10], 2, bos_id=None) == [9, 10]
    assert data.truncate_prompt([1, 8, 9], 3, bos_id=1) == [1, 8, 9]
    assert data.truncate_prompt([0, 8, 9, 10], 3, bos_id=0) == [0, 9, 10]  # the toy's BOS is id 0


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


class RecordScores(LogitsProcessor):
    """Keeps the scores each generation step sees. Custom processors run before generate's temperature
    warper, so the sampler draws from softmax(recorded / T) when top_k = 0 and top_p = 1."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def sampler_logprobs(recorder: RecordScores, completion: torch.Tensor, temperature: float) -> torch.Tensor:
    scores = torch.stack(recorder.steps, 1)[:, : completion.shape[1]]  # [B, C, V]
    logp = F.log_softmax(scores.float() / temperature, dim=-1)
    return logp.gather(-1, completion.clamp(max=scores.shape[-1] - 1)[..., None]).squeeze(-1)


def check_completion_layout(completion: torch.Tensor, has_eos: torch.Tensor, pad_id: int, eos_id: int = EOS):
    """A completion is its tokens up to and including the first EOS, then padding; has_eos iff EOS."""
    for row, eos in zip(completion.tolist(), has_eos.tolist()):
        assert eos == (eos_id in row)
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        assert pad_id not in row[:end], row  # no pad before the end
        assert row[end:] == [pad_id] * (len(row) - end), row  # only pad after the first EOS


def test_generate_pads_after_the_first_eos():
    torch.manual_seed(0)
    model, tok = tiny_lm("gpt2"), stub_tokenizer()
    prompt = data.pad(random_prompts(64), PAD_OUT, "left")
    completion, has_eos = common.generate(model, prompt, tok, max_new_tokens=12, temperature=1.0)
    check_completion_layout(completion, has_eos, PAD_OUT)
    assert completion.shape == (64, 12)  # some rows never stop, so generation runs the full budget
    assert 0 < has_eos.sum() < 64  # both kinds of rows are exercised


def test_greedy_generation_is_the_argmax_of_the_scoring_pass():
    model, tok = tiny_lm("gpt2"), stub_tokenizer()
    prompt = data.pad(random_prompts(16, seed=1), PAD_OUT, "left")
    completion, _ = common.generate(model, prompt, tok, max_new_tokens=6, temperature=0.0)
    again, _ = common.generate(model, prompt, tok, max_new_tokens=6, temperature=0.0)
    assert torch.equal(completion, again)
    with torch.no_grad():
        logits = common.forward(model, torch.cat([prompt, completion], 1), PAD_OUT).logits
    P = prompt.shape[1]
    valid = completion != PAD_OUT
    assert torch.equal(logits[:, P - 1 : -1].argmax(-1)[valid], completion[valid])


def test_sampler_logprobs_equal_completion_logprobs():
    """The 'PPO ratio is exactly 1' precondition: generation and scoring use the same positions, so the
    log-probs of the sampled tokens under generate's own distribution (softmax(logits / T), top_p 1)
    equal completion_logprobs at the same temperature. GPT-2 (absolute positions) left-padded, with a pad
    outside the vocabulary (so it cannot be sampled). Recomputing one sequence at a time, unpadded, agrees too."""
    T = 0.7
    torch.manual_seed(0)
    model, tok, recorder = tiny_lm("gpt2"), stub_tokenizer(), RecordScores()
    prompts = random_prompts(32, seed=2)
    prompt = data.pad(prompts, PAD_OUT, "left")
    completion, has_eos = common.generate(
        model, prompt, tok, 8, temperature=T, logits_processor=LogitsProcessorList([recorder])
    )
    valid = completion != PAD_OUT
    with torch.no_grad():
        logps = common.completion_logprobs(model, prompt, completion, PAD_OUT, temperature=T)
        torch.testing.assert_close(logps[valid], sampler_logprobs(recorder, completion, T)[valid], atol=1e-5, rtol=0)
        for i in range(len(prompts)):
            c = completion[i][valid[i]]
            one = common.completion_logprobs(model, torch.tensor([prompts[i]]), c[None], PAD_OUT, temperature=T)
            torch.testing.assert_close(logps[i][valid[i]], one[0], atol=1e-5, rtol=0)


def test_generate_samples_from_softmax_at_temperature():
    """transformers' sampler, as generate() configures it, draws from softmax(logits / T) and nothing else (no
    top-k 50 by default, no settings from the checkpoint): 20,000 first tokens of one prompt have the frequencies
    of that distribution within 0.01 (about 7 standard errors), and never the pad."""
    T, n = 0.7, 20_000
    torch.manual_seed(0)
    model, tok = tiny_lm("llama"), stub_tokenizer(2)
    model.generation_config.top_k = 1  # a checkpoint's setting that would make sampling greedy
    prompt = data.pad(random_prompts(1, seed=5), 2, "left")
    with torch.no_grad():
        logits = common.forward(model, prompt, 2).logits[0, -1]
    probs = torch.softmax(logits.masked_fill(torch.arange(len(logits)) == 2, -float("inf")) / T, -1)
    completion, _ = common.generate(model, prompt.repeat(n, 1), tok, 1, temperature=T)
    freq = torch.bincount(completion[:, 0], minlength=len(probs)).float() / n
    torch.testing.assert_close(freq, probs, atol=1e-2, rtol=0)
    assert freq[2] == 0


def test_toy_policy_never_emits_the_pad_token():
    """Regression: a sampled pad is read as padding everywhere: masked out of attention with shifted
    positions (its log-probs no longer match the sampler's, so the PPO ratio is not 1) and
    last_token_index points at the wrong token (the reward is read before the EOS). When the toy's pad
    was a row of the LM head, a fresh toy policy at T=1 emitted it in ~15% of 8-token completions. Now
    the toy's pad (id 45) lies outside the model's 45-token vocabulary, so it cannot be sampled; and for
    a tokenizer whose pad IS a vocabulary token, generate() suppresses it (same model and seed: without
    the suppression the token is sampled)."""
    torch.manual_seed(0)
    model, tok = common.load_model("toy-tiny").eval(), toy.make_tokenizer()
    assert tok.pad_token_id == model.config.vocab_size == 45  # outside: no logit for it
    prompt = data.pad(data.tokenize_prompts(tok, toy.sft_dataset("test")["prompt"][:64], 32), tok.pad_token_id, "left")
    completion, has_eos = common.generate(model, prompt, tok, 8, temperature=1.0)
    check_completion_layout(completion, has_eos, tok.pad_token_id, eos_id=tok.eos_token_id)
    assert 0 < has_eos.sum() < 64  # both rows that stop and rows that run the full budget

    # a pad inside the vocabulary (id 0 of the tiny GPT-2, a real token): sampled unless suppressed
    model, prompts = tiny_lm("gpt2"), random_prompts(64, seed=3)
    torch.manual_seed(0)
    other, _ = common.generate(model, data.pad(prompts, PAD_OUT, "left"), stub_tokenizer(PAD_OUT), 8, temperature=1.0)
    assert (other == 0).sum() > 0  # token 0 is an ordinary token here, and the model samples it
    torch.manual_seed(0)
    completion, has_eos = common.generate(model, data.pad(prompts, 0, "left"), stub_tokenizer(0), 8, temperature=1.0)
    check_completion_layout(completion, has_eos, 0)
    assert 0 < has_eos.sum() < 64


def test_generation_ignores_sampling_settings_shipped_with_a_checkpoint(tmp_path):
    """Regression: generate() passes a GenerationConfig, and transformers fills
    its unset fields from the checkpoint's generation_config.json (repetition_penalty, min_p,
    no_repeat_ngram_size, suppress_tokens...; chat checkpoints commonly ship some). The sampler then
    differs from the softmax(logits / T) that completion_logprobs scores, and the PPO ratio is not 1."""
    T = 1.0
    model = tiny_lm("gpt2")
    model.generation_config.repetition_penalty = 1.5
    model.save_pretrained(tmp_path)
    model = common.load_model(str(tmp_path)).eval()
    assert model.generation_config.repetition_penalty == 1.5  # as loaded from generation_config.json
    torch.manual_seed(0)
    recorder = RecordScores()
    prompt = data.pad(random_prompts(16, seed=3), PAD_OUT, "left")
    completion, _ = common.generate(
        model, prompt, stub_tokenizer(), 8, temperature=T, logits_processor=LogitsProcessorList([recorder])
    )
    valid = completion != PAD_OUT
    with torch.no_grad():
        logps = common.completion_logprobs(model, prompt, completion, PAD_OUT, temperature=T)
    torch.testing.assert_close(logps[valid], sampler_logprobs(recorder, completion, T)[valid], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_load_model_reward_head_init_and_dropout_off(tmp_path):
    """A causal checkpoint loaded as a reward model gets a fresh head of std 1/sqrt(H+1) (N+); dropout is
    zeroed; a saved reward model keeps its trained head."""
    config = tiny_config("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")
    with pytest.raises(training.UserError, match="looks like a policy, not a reward model"):  # no head: an error
        common.load_model(str(tmp_path / "lm"), kind="reward")
    rm = common.load_model(str(tmp_path / "lm"), kind="reward", new_head="normal")  # as reward.py asks for one
    assert rm.score.weight.shape == (1, 32)
    assert 0.5 / math.sqrt(33) < rm.score.weight.std().item() < 1.5 / math.sqrt(33)  # HF's default is 0.02
    assert all(m.p == 0.0 for m in rm.modules() if isinstance(m, torch.nn.Dropout))
    rm.config.reward_bias = 0.25
    rm.save_pretrained(tmp_path / "rm")
    again = common.load_model(str(tmp_path / "rm"), kind="reward")
    assert torch.equal(again.score.weight, rm.score.weight) and again.config.reward_bias == 0.25


def test_load_model_builds_a_fresh_toy_reward_model():
    """`reward.py --model toy` (a reward model trained from scratch, which reward.py's `args.model != "toy"`
    check anticipates) calls load_model("toy", kind="reward"); `from_config(config, num_labels=1)` was a
    TypeError (num_labels belongs on the config). Regression test."""
    torch.manual_seed(0)
    rm = common.load_model("toy-tiny", kind="reward", new_head="normal")
    assert rm.config.num_labels == 1 and rm.score.weight.shape == (1, 64)
    assert 0.5 / math.sqrt(65) < rm.score.weight.std().item() < 1.5 / math.sqrt(65)


def test_load_model_unknown_hub_id_offline_is_a_user_error():
    with pytest.raises(training.UserError, match="someone/does-not-exist"):
        common.load_model("someone/does-not-exist")
    with pytest.raises(training.UserError, match="someone/does-not-exist"):
        data.load_tokenizer("someone/does-not-exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_setup_is_distributed_under_torchrun_on_cpu(tmp_path):
    """Regression: `torchrun --nproc_per_node 2` on CPU (gloo) exercises the multi-process path;
    Accelerator() on CPU ignores torchrun unless cpu=True, so each rank ran alone (num_processes 1) and
    both wrote the same run directory. Each rank writes its own file: the two ranks share torchrun's
    stdout, where their prints interleave ("ranksranks 2 1" then " 2 0")."""
    script = tmp_path / "setup_ranks.py"
    script.write_text(
        'import os, pathlib, common\nacc = common.setup(type("A", (), {"seed": 0})())\n'
        f"pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK'])"
        ".write_text(f'{acc.num_processes} {acc.process_index}')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    ranks = {f.name: f.read_text() for f in tmp_path.glob("rank*")}
    assert ranks == {"rank0": "2 0", "rank1": "2 1"}, out.stderr[-2000:]  # torchrun's RANK = accelerate's process_index


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------

ROWS = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(30)]
SFT_COLUMNS = ("prompt", "completion")


def test_load_data_toy_both_kinds():
    sft = data.load_data("toy", "test", SFT_COLUMNS)
    pref = data.load_data("toy", "test", ("prompt", "chosen", "rejected"))
    assert (sft.column_names, len(sft)) == (["prompt", "completion"], 1000)
    assert (pref.column_names, len(pref)) == (["prompt", "chosen", "rejected"], 1000)
    assert len(data.load_data("toy", "train", SFT_COLUMNS)) == 20_000


def write_rows(path: Path, rows: list[dict]) -> str:
    ds = datasets.Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        ds.to_json(path)  # JSON lines
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))  # one JSON array
    elif path.suffix == ".csv":
        ds.to_csv(path, index=False)
    else:
        ds.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_load_data_files(tmp_path, ext):
    name = write_rows(tmp_path / f"data.{ext}", ROWS)
    train = data.load_data(name, "train", SFT_COLUMNS)
    # only a train split: the test split is its last 10% (3 rows), held out of the training rows
    assert train["prompt"] == [f"p{i}" for i in range(27)] and train["completion"] == [f" c{i}" for i in range(27)]
    assert data.load_data(name, "test", SFT_COLUMNS)["prompt"] == ["p27", "p28", "p29"]


def test_load_data_save_to_disk(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "flat")  # a Dataset, no splits: like a file
    assert data.load_data(str(tmp_path / "flat"), "train", SFT_COLUMNS)["prompt"] == [f"p{i}" for i in range(27)]
    assert data.load_data(str(tmp_path / "flat"), "test", SFT_COLUMNS)["prompt"] == ["p27", "p28", "p29"]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:20]), "test": datasets.Dataset.from_list(ROWS[20:])}
    )
    splits.save_to_disk(tmp_path / "dict")
    assert data.load_data(str(tmp_path / "dict"), "train", SFT_COLUMNS)["prompt"] == [f"p{i}" for i in range(20)]
    assert data.load_data(str(tmp_path / "dict"), "test", SFT_COLUMNS)["prompt"] == [f"p{i}" for i in range(20, 30)]
    with pytest.raises(training.UserError, match="validation"):
        data.load_data(str(tmp_path / "dict"), "validation", SFT_COLUMNS)


@pytest.mark.parametrize("n, n_test", [(2, 1), (19, 1), (20, 2), (6000, 500)])
def test_held_out_rows_are_not_training_rows(tmp_path, capsys, n, n_test):
    """A file without a test split: its last 10% (at least 1, at most 500 rows) are the test split and
    the rows before them the train split, whatever columns a script asks for; the counts are printed once."""
    name = write_rows(tmp_path / "data.jsonl", [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(n)])
    train, test = (data.load_data(name, split, SFT_COLUMNS)["prompt"] for split in ("train", "test"))
    assert train == [f"p{i}" for i in range(n - n_test)] and test == [f"p{i}" for i in range(n - n_test, n)]
    assert data.load_data(name, "train", ("prompt",))["prompt"] == train  # RL scripts: the same rows
    assert capsys.readouterr().out.splitlines() == [
        f"[data] {name!r} has no test split: {n - n_test} rows for training, {n_test} held out for evaluation"
    ]


def test_a_one_row_file_cannot_hold_out_a_test_row(tmp_path):
    name = write_rows(tmp_path / "one.jsonl", ROWS[:1])
    for split in ("train", "test"):
        with pytest.raises(training.UserError, match=r"1 row and no test split: it needs 2 or more"):
            data.load_data(name, split, SFT_COLUMNS)


def test_held_out_split_of_hub_layouts():
    """A Hub dataset with a train split only is split like a file (also under ultrafeedback's names); one
    with a test split, or a validation split standing for it, passes through unchanged."""
    rows = datasets.Dataset.from_list(ROWS)
    for train_name, columns in (("train", SFT_COLUMNS), ("train_sft", SFT_COLUMNS), ("train_gen", ("prompt",))):
        dd = datasets.DatasetDict({train_name: rows})
        assert len(data._pick_split(dd, "train", "org/data", columns)) == 27
        assert data._pick_split(dd, "test", "org/data", columns)["prompt"] == ["p27", "p28", "p29"]
    for test_name in ("test", "validation", "test_sft"):
        dd = datasets.DatasetDict({"train": rows, test_name: rows.select(range(2))})
        assert len(data._pick_split(dd, "train", "org/data", SFT_COLUMNS)) == 30
        assert len(data._pick_split(dd, "test", "org/data", SFT_COLUMNS)) == 2


def test_load_data_missing_column_names_it(tmp_path):
    name = write_rows(tmp_path / "data.jsonl", [{"prompt": "p", "answer": " a"}] * 2)
    with pytest.raises(training.UserError, match=r"lacks column\(s\) \['completion'\]"):
        data.load_data(name, "train", SFT_COLUMNS)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "save_to_disk"])
def test_load_data_empty_dataset(tmp_path, kind):
    """Regression: every empty source fails inside `datasets` with a bare
    exception (jsonl: StopIteration; header-only csv, 0-row parquet: ValueError "corresponds to no data";
    empty save_to_disk: IndexError), so load_data's own "is empty" UserError is never reached."""
    empty = datasets.Dataset.from_dict({"prompt": [], "completion": []})
    path = tmp_path / f"empty.{kind}"
    if kind == "jsonl":
        path.write_text("")
    elif kind == "csv":
        path.write_text("prompt,completion\n")
    elif kind == "parquet":
        empty.to_parquet(path)
    else:
        empty.save_to_disk(path)
    with pytest.raises(training.UserError, match="empty"):
        data.load_data(str(path), "train", SFT_COLUMNS)


def test_load_data_bad_names(tmp_path):
    with pytest.raises(training.UserError, match="does not exist"):
        data.load_data(str(tmp_path / "nope.jsonl"), "train", SFT_COLUMNS)
    (tmp_path / "data.txt").write_text("p\tc\n")
    with pytest.raises(training.UserError, match="data.txt"):
        data.load_data(str(tmp_path / "data.txt"), "train", SFT_COLUMNS)
    with pytest.raises(training.UserError, match="someone/does-not-exist"):  # offline (conftest)
        data.load_data("someone/does-not-exist", "train", SFT_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Runs and evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class RunArgs:
    exp_name: str = "unit"
    seed: int = 3
    output_dir: str = "runs"
    run_name: str | None = "r"
    track: bool = False
    wandb_project: str = "rlhf"


def test_run_writes_its_files(tmp_path):
    args = RunArgs(output_dir=str(tmp_path))
    run = training.Run(args, common.setup(args), total=2)
    run.log({"loss": torch.tensor(0.5), "lr": 1e-3}, update=1)
    run.log_eval(2, {"loss": 0.25}, [{"prompt": "POST: a TL;DR:", "completion": "a", "gold": 0.55}])
    run.finish({"eval/win_rate": 0.75}, initial={"eval/win_rate": 0.5}, times={"time/update": 0.125})
    d = tmp_path / "r"
    assert json.loads((d / "args.json").read_text()) == {
        "exp_name": "unit",
        "seed": 3,
        "output_dir": str(tmp_path),
        "run_name": "r",
        "track": False,
        "wandb_project": "rlhf",
    }
    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 0.5, "lr": 1e-3}, {"step": 2, "loss": 0.25}]
    assert [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()] == [
        {"step": 2, "prompt": "POST: a TL;DR:", "completion": "a", "gold": 0.55}
    ]
    summary = json.loads((d / "eval.json").read_text())
    assert summary["initial/win_rate"] == 0.5 and summary["eval/win_rate"] == 0.75
    assert summary["time/update_last"] == 0.125 and summary["time/total"] > 0 and summary["memory/peak_mb"] > 0
    assert any(f.name.startswith("events.out.tfevents") for f in d.iterdir())


def test_a_wandb_that_does_not_start_leaves_no_run(tmp_path, monkeypatch):
    """--track with a wandb that fails to start (no login, no network): one error, and no run directory, so
    the same --run-name starts afresh."""

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    args = RunArgs(output_dir=str(tmp_path), track=True)
    with pytest.raises(
        training.UserError, match=r"^--track: wandb did not start \(api_key not configured \(no-tty\)\)"
    ):
        training.Run(args, common.setup(args), total=2)
    assert not (tmp_path / "r").exists()
    args = RunArgs(output_dir=str(tmp_path))
    training.Run(args, common.setup(args), total=2).finish({})
    assert (tmp_path / "r" / "eval.json").exists()


def test_evaluate_on_the_toy_task():
    """Greedy completions of a fresh toy policy: every figure is recomputed here from the samples, and KL
    to itself is exactly 0."""
    torch.manual_seed(0)
    policy, tok = common.load_model("toy-tiny"), toy.make_tokenizer()
    config = toy.model_config("tiny")
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    ds = toy.sft_dataset("test").select(range(20))
    policy.train()
    args = SimpleNamespace(dataset="toy", max_prompt_length=32, max_new_tokens=8, no_eos_score=-1.0, judge="toy:gold")
    args.judge_model, args.judge_template = None, "summary"
    judge = common.load_judge(args)
    metrics, samples = common.evaluate(policy, tok, ds, args, policy, rm, judge, batch_size=8)
    assert policy.training  # restored
    judged = {"eval/win_rate", "eval/judge_ties", "eval/judge_score", "eval/judge_score_reference"}
    assert set(metrics) == {"eval/score", "eval/length", "eval/eos", "eval/kl", *judged}
    assert metrics["eval/kl"] == 0.0
    assert len(samples) == 20 and [s["prompt"] for s in samples] == list(ds["prompt"])
    assert [s["reference"] for s in samples] == list(ds["completion"])  # each sample beside its reference
    golds = [s["judgment"]["score"] for s in samples]
    assert metrics["eval/judge_score"] == pytest.approx(sum(golds) / 20)
    ref_golds = [toy.gold_reward(p, c) for p, c in zip(ds["prompt"], ds["completion"])]
    wins = [1.0 if g > r else 0.5 if g == r else 0.0 for g, r in zip(golds, ref_golds)]  # ties count half
    assert metrics["eval/win_rate"] == pytest.approx(sum(wins) / 20)
    # the greedy completions, EOS rate, length and reward-model scores, recomputed in one batch
    pad_id = tok.pad_token_id
    prompt = data.pad(data.tokenize_prompts(tok, list(ds["prompt"]), 32), pad_id, "left")
    completion, has_eos = common.generate(policy.eval(), prompt, tok, 8, temperature=0.0)
    with torch.no_grad():
        scores = common.reward_scores(rm, prompt, completion, pad_id, has_eos, no_eos_score=-1.0)
    texts = tok.batch_decode(completion, skip_special_tokens=True)
    assert [s["completion"] for s in samples] == texts
    assert golds == [toy.gold_reward(p, t, bool(e)) for p, t, e in zip(ds["prompt"], texts, has_eos)]
    assert metrics["eval/eos"] == pytest.approx(has_eos.float().mean().item())
    assert metrics["eval/length"] == pytest.approx((completion != pad_id).sum(1).float().mean().item())
    assert [s["score"] for s in samples] == pytest.approx(scores.tolist(), abs=1e-5)
    assert metrics["eval/score"] == pytest.approx(scores.mean().item(), abs=1e-5)


def test_toy_gold_reward_model_scores_with_the_gold_reward(toy_cache):
    """`--reward-model toy-gold`: reward_scores gives toy.gold_reward of the decoded texts (then the usual
    missing-EOS rule); the network is toy-rm's with its head at 0 and no bias, so a PPO critic started from it
    predicts 0, not toy-rm's scores (another scale than the gold reward's); it refuses to be trained."""
    tokenizer = toy.make_tokenizer()
    gold_model = common.load_model("toy-gold", "reward").eval().requires_grad_(False)
    prompts = toy.sft_dataset("test")["prompt"][:3]
    texts = [
        " " + " ".join(toy.ideal_summary(toy.post_words(prompts[0]))),
        " very very",
        " " + toy.post_words(prompts[2])[0],
    ]
    prompt = data.pad(data.tokenize_prompts(tokenizer, prompts, 32), tokenizer.pad_token_id, "left")
    completion = data.pad(
        [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts[:2]]
        + [tokenizer(texts[2], add_special_tokens=False)["input_ids"]],
        tokenizer.pad_token_id,
        "right",
    )
    has_eos = (completion == tokenizer.eos_token_id).any(1)
    with torch.no_grad():
        scores = common.reward_scores(gold_model, prompt, completion, tokenizer.pad_token_id)
        penalized = common.reward_scores(gold_model, prompt, completion, tokenizer.pad_token_id, has_eos, -1.0)
    expected = [toy.gold_reward(p, t, bool(e)) for p, t, e in zip(prompts, texts, has_eos)]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert scores[0] == 1.0 and penalized[2] == -1.0 and penalized[1] == scores[1]
    rm = common.load_model("toy-rm", "reward")
    body = [k for k in rm.state_dict() if not k.startswith("score.")]
    assert body and all(torch.equal(gold_model.state_dict()[k], rm.state_dict()[k]) for k in body)
    assert rm.score.weight.abs().sum() > 0 and getattr(rm.config, "reward_bias", 0.0) != 0.0
    assert not gold_model.score.weight.any() and gold_model.config.reward_bias == 0.0
    with pytest.raises(training.UserError, match="toy-gold"):
        common.reward_scores(gold_model, prompt, completion, tokenizer.pad_token_id)  # gradients on: a training step
