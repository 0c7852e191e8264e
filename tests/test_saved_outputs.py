"""What a run saves works in other tools. Every script's final model, after two updates on tiny GPT-2 (no pad
token) and Llama (Llama 3's tokenizer: no pad, BOS added) checkpoints, and the toy SFT and reward models, loads
with plain transformers (AutoTokenizer, AutoModelForCausalLM / AutoModelForSequenceClassification; no pad set
by hand):
- a policy generates 4 left-padded prompts of different lengths as it generates each prompt alone (greedy);
- a reward model scores a padded batch as one text at a time, and as the scripts score (at the EOS, less
  config.reward_bias);
- a LoRA run's adapter/ loads with peft onto the model the run started from and equals the merged model;
- the next stage loads a saved stage with the pad id the first stage trained with, and the policy and the
  reward model it trained agree on the tokenizer (no re-tokenization).
The real checkpoints' chain is SFT from the base model, the reward model from the SFT model, and every other
script from both; the toy's is the session's toy-sft and toy-rm, outputs of sft.py and reward.py (the toy
data makes every toy run take seconds: the other scripts save through the same code)."""

import pytest
import torch
from test_formats import tldr_prompt
from test_real_models import SCRIPTS, hub_files, plain_text_runs  # noqa: F401 (hub_files: a fixture)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import data
import toy

FAMILIES = ["toy", "gpt2", "llama"]
SCRIPT_NAMES = ["sft", "dpo", "ppo", "drpo", "rebel", "xpo", "aihf"]
POLICIES = [("toy", "sft")] + [(family, name) for family in ("gpt2", "llama") for name in SCRIPT_NAMES]


@pytest.fixture(scope="module")
def saved(toy_cache, tiny_checkpoints, hub_files, tmp_path_factory):  # noqa: F811
    """saved(family, script) -> the directory of that script's run, run once (two updates)."""
    root, done = tmp_path_factory.mktemp("saved"), {}

    def run(family: str, name: str, **changes):
        key = (family, name, tuple(sorted(changes.items())))
        if family == "toy":
            return toy_cache / {"sft": "toy-sft", "reward": "toy-rm"}[name]
        if key not in done:  # the chain: SFT from the base model, the reward model from SFT, the rest from both
            lm, rm = tiny_checkpoints[family]
            lm = lm if name == "sft" else str(run(family, "sft"))
            rm = rm if name in ("sft", "reward") else str(run(family, "reward"))
            module, args = SCRIPTS[name], plain_text_runs(lm, rm, hub_files)[name]
            for k, v in changes.items():
                setattr(args, k, v)
            args.output_dir, args.run_name = str(root), f"{name}-{family}-{len(done)}"
            module.main(args)
            done[key] = root / args.run_name
        return done[key]

    return run


def base_model(family, tiny_checkpoints):
    return "toy-tiny" if family == "toy" else tiny_checkpoints[family][0]


def prompts(family):
    """Four prompts of different token lengths."""
    if family == "toy":
        posts = ["rain cat", "dog very dog so", "exam then exam car car now", "boss rent boss rent now rent boss okay"]
        return [toy.prompt_text(p.split()) for p in posts]
    posts = ["Rent.", "My dog ate my homework again.", "Help?", "We had a party and the neighbours called twice."]
    return [tldr_prompt(i, post) for i, post in enumerate(posts)]


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("family, name", POLICIES)
def test_a_saved_policy_generates_a_left_padded_batch_like_one_prompt_at_a_time(saved, family, name):
    path = saved(family, name)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    pad = tok.pad_token_id
    assert pad is not None and pad < model.config.vocab_size  # a pad the embedding has a row for
    assert model.config.pad_token_id == model.generation_config.pad_token_id == pad
    texts = prompts(family)
    batch = tok(texts, padding=True, return_tensors="pt")
    assert tok.padding_side == "left" and len(set(batch["attention_mask"].sum(1).tolist())) == 4
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for i, text in enumerate(texts):
            one = tok([text], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=6, do_sample=False)[0, one["input_ids"].shape[1] :]
            assert until_eos(out[i].tolist(), tok.eos_token_id) == until_eos(alone.tolist(), tok.eos_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_reward_model_scores_a_padded_batch_like_one_text_at_a_time_and_like_the_scripts(saved, family):
    path = saved(family, "reward")
    tok, rm = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id and tok.pad_token_id < rm.config.vocab_size
    if family == "toy":  # the toy's words are split at spaces
        completions, sep = [" rain cat", " dog", " exam then exam exam", " boss"], " "
    else:
        completions, sep = [" Rent is late.", " Dog.", " I", " Noise, twice, at night."], ""
    texts = [p + c + sep + tok.eos_token for p, c in zip(prompts(family), completions)]  # scored at the EOS
    with torch.no_grad():
        batch = tok(texts, padding=True, return_tensors="pt")
        assert len(set(batch["attention_mask"].sum(1).tolist())) == 4
        scores = rm(**batch).logits[:, 0]
        alone = torch.cat([rm(**tok([t], return_tensors="pt")).logits[:, 0] for t in texts])
        # the scripts' score: read at the EOS of the same ids, less the stored bias
        ours, own = common.load_model(str(path), "reward"), data.load_tokenizer(str(path))
        pairs = [data.tokenize_pair(own, p, c, 256, 64) for p, c in zip(prompts(family), completions)]
        prompt = data.pad([p for p, _ in pairs], own.pad_token_id, "left")
        completion = data.pad([c for _, c in pairs], own.pad_token_id, "right")
        expected = common.reward_scores(ours, prompt, completion, own.pad_token_id)
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores - rm.config.reward_bias, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_next_stage_pads_like_the_first(saved, tiny_checkpoints, family):
    """The SFT model's saved tokenizer pads with EOS; loaded for the next stage it gets the first stage's pad
    id again, which the reward model trained from it shares: the scripts read both with one tokenizer."""
    sft_dir, rm_dir = str(saved(family, "sft")), str(saved(family, "reward"))
    base = data.load_tokenizer(base_model(family, tiny_checkpoints))
    policy = data.load_tokenizer(sft_dir)
    assert AutoTokenizer.from_pretrained(sft_dir).pad_token_id == policy.eos_token_id
    assert policy.pad_token_id == base.pad_token_id != policy.eos_token_id
    assert policy.get_vocab() == base.get_vocab() == data.load_tokenizer(rm_dir).get_vocab()
    assert getattr(common.load_model(rm_dir, "reward", tokenizer=policy), "retokenize", None) is None
    # the added pad is not in the saved tokenizer: every id has an embedding row
    vocab_size = AutoModelForCausalLM.from_pretrained(sft_dir).config.vocab_size
    assert len(AutoTokenizer.from_pretrained(sft_dir)) == vocab_size


@pytest.mark.parametrize("family, name", [("gpt2", "sft"), ("llama", "dpo")])
def test_a_saved_lora_adapter_loads_with_peft_onto_its_base_model_and_equals_the_merged_model(saved, family, name):
    peft = pytest.importorskip("peft")
    path = saved(family, name, lora_r=4, lora_alpha=8, lr=1e-2)
    tok = AutoTokenizer.from_pretrained(path / "adapter")
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(path / "adapter").eval()  # its base from adapter_config
    merged = AutoModelForCausalLM.from_pretrained(path).eval()
    batch = tok(prompts(family), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = adapted(**batch).logits
        with adapted.disable_adapter():
            base = adapted(**batch).logits
        expected = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=0)
    assert (base[mask] - expected[mask]).abs().max() > 1e-3  # the adapter changed the model
