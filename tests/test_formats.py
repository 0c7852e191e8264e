"""Real tokenizers, real dataset layouts, reward models with another tokenizer (common.py's data section).

Every file is written here in the exact schema of the Hub dataset it stands for (trl-lib/tldr,
trl-lib/tldr-preference, Anthropic/hh-rlhf, HuggingFaceH4/ultrafeedback_binarized, trl-lib/ultrafeedback-prompt),
and every tokenizer is a tiny BPE trained by tests/tiny_models.py with its family's special tokens."""

import json
from pathlib import Path

import datasets
import pytest
import tiny_models
import torch

import common
import data
import training

PREF, SFT, PROMPT = ("prompt", "chosen", "rejected"), ("prompt", "completion"), ("prompt",)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tldr_prompt(i: int, post: str = "My roommate never pays the rent on time.") -> str:
    """trl-lib/tldr's prompt: the N+ query format."""
    return f"SUBREDDIT: r/relationships\n\nTITLE: Question {i} about my roommate\n\nPOST: {post}\n\nTL;DR:"


# ---------------------------------------------------------------------------------------------
# Tokenizers of real families: pad handling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_load_tokenizer_on_real_families(tiny_checkpoints, arch):
    """No pad (GPT-2, Llama) or pad == EOS (Pythia setups): a dedicated <|pad|>, one past the embedding, or
    on one of its spare rows (Pythia). Qwen2's own <|endoftext|> pad is distinct from its EOS: kept."""
    path, _ = tiny_checkpoints[arch]
    tok, model = data.load_tokenizer(path), common.load_model(path)
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    if arch == "qwen2":
        assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("<|endoftext|>", 0, model.config.vocab_size)
    elif arch == "gpt_neox":  # the new pad takes a spare, untrained row
        assert (tok.pad_token, tok.pad_token_id, model.config.vocab_size) == ("<|pad|>", 400, 448)
    else:
        assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", model.config.vocab_size)  # no embedding row


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_left_padded_batch_equals_one_at_a_time_on_real_tokenizers(tiny_checkpoints, arch):
    """Prompts of different lengths, left-padded with the tokenizer's pad (outside the embedding for three of
    the four): log-probs, greedy generations and reward scores equal each row run alone."""
    path, rm_path = tiny_checkpoints[arch]
    tok, model = data.load_tokenizer(path), common.load_model(path).eval()
    rm = common.load_model(rm_path, "reward", tokenizer=tok).eval()
    assert getattr(rm, "retokenize", None) is None  # same tokenizer: ids go straight in
    texts = [tldr_prompt(1), "Hello there?", "SUBREDDIT: r/dog\n\nPOST: my dog ate my phone\n\nTL;DR:"]
    pairs = [data.tokenize_pair(tok, t, " Thanks for the advice.", 64, 16) for t in texts]
    prompt = data.pad([p for p, _ in pairs], tok.pad_token_id, "left")
    completion = data.pad([c for _, c in pairs], tok.pad_token_id, "right")
    with torch.no_grad():
        logps = common.completion_logprobs(model, prompt, completion, tok.pad_token_id)
        scores = common.reward_scores(rm, prompt, completion, tok.pad_token_id)
        greedy, _ = common.generate(model, prompt, tok, max_new_tokens=4, temperature=0.0)
        for i, (p, c) in enumerate(pairs):
            alone = common.completion_logprobs(model, torch.tensor([p]), torch.tensor([c]), tok.pad_token_id)[0]
            torch.testing.assert_close(logps[i, : len(c)], alone, atol=1e-5, rtol=0)
            score = common.reward_scores(rm, torch.tensor([p]), torch.tensor([c]), tok.pad_token_id)[0]
            torch.testing.assert_close(scores[i], score, atol=1e-5, rtol=0)
            g, _ = common.generate(model, torch.tensor([p]), tok, max_new_tokens=4, temperature=0.0)
            assert greedy[i, : g.shape[1]].tolist() == g[0].tolist()


# ---------------------------------------------------------------------------------------------
# TL;DR (trl-lib/tldr, trl-lib/tldr-preference) and the prompt truncation policy
# ---------------------------------------------------------------------------------------------


def test_tldr_prompt_completion_file(tiny_checkpoints, tmp_path):
    rows = [{"prompt": tldr_prompt(i), "completion": f" Roommate {i} is late with rent."} for i in range(20)]
    ds = data.load_data(write_jsonl(tmp_path / "tldr.jsonl", rows), "train", SFT)
    assert ds.column_names == ["prompt", "completion"] and ds[3] == rows[3]
    tok = data.load_tokenizer(tiny_checkpoints["gpt_neox"][0])
    prompt, completion = data.tokenize_pair(tok, ds[0]["prompt"], ds[0]["completion"], 512, 53)
    assert tok.decode(prompt) == rows[0]["prompt"]  # " Roommate" stays one word of the completion
    assert tok.decode(completion) == rows[0]["completion"] + "<|endoftext|>" and completion.count(tok.eos_token_id) == 1


def test_tldr_preference_splits_train_and_validation(tmp_path):
    """trl-lib/tldr-preference has train and validation splits: `validation` serves as the test split."""
    rows = [{"prompt": tldr_prompt(i), "chosen": " Rent is late.", "rejected": " I like dogs."} for i in range(8)]
    splits = {"train": datasets.Dataset.from_list(rows[:6]), "validation": datasets.Dataset.from_list(rows[6:])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "pref")
    assert data.load_data(str(tmp_path / "pref"), "train", PREF)[0] == rows[0]
    assert data.load_data(str(tmp_path / "pref"), "test", PREF)["prompt"] == [rows[6]["prompt"], rows[7]["prompt"]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_long_post_keeps_its_end_and_bos(tiny_checkpoints, arch):
    """A post longer than --max-prompt-length keeps its last tokens (the end of the post and `TL;DR:`, what
    the summary continues), the BOS first where the tokenizer adds one (Llama)."""
    tok = data.load_tokenizer(tiny_checkpoints[arch][0])
    long_post = tldr_prompt(0, post=" ".join(["My boss asked me to work again this week and I said no."] * 20))
    full, _ = data.tokenize_pair(tok, long_post, " Boss.", 10_000, 16)
    prompt, completion = data.tokenize_pair(tok, long_post, " Boss.", 24, 16)
    assert len(full) > 100 and len(prompt) == 24
    if arch == "llama":
        assert full[0] == prompt[0] == tok.bos_token_id and prompt[1:] == full[-23:]
    else:
        assert tok.bos_token_id not in full and prompt == full[-24:]
    assert tok.decode(prompt).endswith("I said no.\n\nTL;DR:")
    assert data.tokenize_prompts(tok, [long_post], 24) == [prompt]


# ---------------------------------------------------------------------------------------------
# Anthropic/hh-rlhf: chosen/rejected transcripts only
# ---------------------------------------------------------------------------------------------

HH_ROWS = [
    {  # one turn
        "chosen": "\n\nHuman: How do I pay rent?\n\nAssistant: Ask your landlord how they want it.",
        "rejected": "\n\nHuman: How do I pay rent?\n\nAssistant: I don't know.",
    },
    {  # two turns; the replies share their first words, which stay in the continuations
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is my dog ok?\n\nAssistant: I think so, ask a vet.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is my dog ok?\n\nAssistant: I think not.",
    },
    {  # identical transcripts (they occur in HH)
        "chosen": "\n\nHuman: Thanks\n\nAssistant: You're welcome.",
        "rejected": "\n\nHuman: Thanks\n\nAssistant: You're welcome.",
    },
]


def test_hh_transcripts_become_prompt_chosen_rejected(tmp_path):
    name = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS * 4)
    ds = data.load_data(name, "train", PREF)
    assert ds.column_names == list(PREF) and len(ds) == 11  # the 12th row is held out for evaluation
    assert ds[0] == {
        "prompt": "\n\nHuman: How do I pay rent?\n\nAssistant:",
        "chosen": " Ask your landlord how they want it.",
        "rejected": " I don't know.",
    }
    assert ds[1] == {
        "prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is my dog ok?\n\nAssistant:",
        "chosen": " I think so, ask a vet.",
        "rejected": " I think not.",
    }
    assert ds[2] == {
        "prompt": "\n\nHuman: Thanks\n\nAssistant:",
        "chosen": " You're welcome.",
        "rejected": " You're welcome.",
    }
    for row, original in zip(ds, HH_ROWS):
        assert (
            row["prompt"] + row["chosen"] == original["chosen"]
            and row["prompt"] + row["rejected"] == original["rejected"]
        )
    # RL scripts ask for prompts only; SFT asks for completions: the chosen replies
    assert data.load_data(name, "test", PROMPT)["prompt"] == [ds[2]["prompt"]]  # row 12 is HH_ROWS[2]
    assert data.load_data(name, "train", SFT)["completion"][:3] == ds["chosen"][:3]


def test_hh_without_a_shared_assistant_turn_is_a_user_error(tmp_path):
    rows = HH_ROWS + [{"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hello"}] + HH_ROWS  # row 6 is held out
    with pytest.raises(training.UserError, match=r"row 3: .*Assistant"):
        data.load_data(write_jsonl(tmp_path / "hh.jsonl", rows), "train", PREF)


# ---------------------------------------------------------------------------------------------
# Conversational data: HuggingFaceH4/ultrafeedback_binarized, trl-lib/ultrafeedback-prompt
# ---------------------------------------------------------------------------------------------


def ultrafeedback_row(i: int) -> dict:
    """One row of ultrafeedback_binarized (every split has these columns)."""
    question = f"What should I do about my roommate {i}?"
    user = {"role": "user", "content": question}
    chosen = [user, {"role": "assistant", "content": "Talk to them calmly."}]
    rejected = [user, {"role": "assistant", "content": "Move out."}]
    return {
        "prompt": question,
        "prompt_id": f"{i:064x}",
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }


@pytest.fixture
def ultrafeedback(tmp_path) -> str:
    """ultrafeedback_binarized's six splits, saved with save_to_disk."""
    splits = {
        f"{s}_{k}": datasets.Dataset.from_list([ultrafeedback_row(i) for i in range(6 if s == "train" else 2)])
        for s in ("train", "test")
        for k in ("prefs", "sft", "gen")
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "uf")
    return str(tmp_path / "uf")


def test_ultrafeedback_splits_and_columns(ultrafeedback, capsys):
    user = [{"role": "user", "content": "What should I do about my roommate 0?"}]
    pref = data.load_data(ultrafeedback, "train", PREF)
    assert "'train_prefs' as the train split" in capsys.readouterr().out
    assert pref.column_names == list(PREF) and len(pref) == 6
    assert pref[0] == {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "Talk to them calmly."}],
        "rejected": [{"role": "assistant", "content": "Move out."}],
    }
    assert len(data.load_data(ultrafeedback, "test", PREF)) == 2
    sft = data.load_data(ultrafeedback, "test", SFT)
    out = capsys.readouterr().out
    assert "'test_sft' as the test split" in out and "chosen" not in out  # from `messages`
    assert sft[0]["completion"] == [{"role": "assistant", "content": "Talk to them calmly."}]
    prompts = data.load_data(ultrafeedback, "train", PROMPT)
    assert "'train_gen' as the train split" in capsys.readouterr().out
    assert prompts[0]["prompt"] == user  # messages, to be rendered by the chat template (not the plain string)
    with pytest.raises(training.UserError, match=r"no split 'validation'.*train_prefs"):
        data.load_data(ultrafeedback, "validation", PREF)


def test_messages_only_sft_data(tmp_path):
    """UltraChat-style `messages`: the last assistant turn is the completion, earlier turns the prompt."""
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    name = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Hi", "messages": msgs}] * 3)
    assert data.load_data(name, "train", SFT)[0] == {"prompt": msgs[:3], "completion": msgs[3:]}
    name = write_jsonl(tmp_path / "open.jsonl", [{"messages": msgs[:3]}] * 3)
    assert data.load_data(name, "train", PROMPT)[0]["prompt"] == msgs[:3]
    with pytest.raises(training.UserError, match="does not end with an assistant turn"):
        data.load_data(name, "train", SFT)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chat_template_rendering_has_one_bos_and_one_eos(tiny_checkpoints, ultrafeedback, arch):
    """Prompt = apply_chat_template(..., add_generation_prompt=True), exactly, with no system prompt added;
    the Llama template writes BOS itself, so the tokenizer adds none. Completion = the reply as the template
    writes it, up to and including the end-of-turn EOS: one EOS, nothing after it."""
    tok = data.load_tokenizer(tiny_checkpoints[arch][0])
    row = data.load_data(ultrafeedback, "train", PREF)[0]
    rendered = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert "system" not in rendered
    prompt, chosen = data.tokenize_pair(tok, row["prompt"], row["chosen"], 256, 64)
    assert tok.decode(prompt) == rendered
    assert data.tokenize_prompts(tok, [row["prompt"]], 256) == [prompt]
    end = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>"}[arch]
    assert tok.decode(chosen) == "Talk to them calmly." + end
    assert chosen.count(tok.eos_token_id) == 1 and chosen[-1] == tok.eos_token_id
    if arch == "llama":
        assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
        assert tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2  # what plain tokenization would do
    # trl-lib/ultrafeedback-prompt: a `prompt` column of messages, for the RL scripts
    (prompt_only,) = data.tokenize_prompts(tok, [[{"role": "user", "content": "Hi"}]], 256)
    assert tok.decode(prompt_only) == tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )


def test_conversational_data_without_a_chat_template_is_a_user_error(tiny_checkpoints):
    tok = data.load_tokenizer(tiny_checkpoints["gpt2"][0])
    with pytest.raises(training.UserError, match="chat template"):
        data.tokenize_prompts(tok, [[{"role": "user", "content": "Hi"}]], 64)


# ---------------------------------------------------------------------------------------------
# A reward model with its own tokenizer
# ---------------------------------------------------------------------------------------------


def test_reward_model_with_another_tokenizer_scores_its_own_tokenization(tmp_path):
    """Policy: GPT-2-like BPE (no BOS). Reward model: a Llama with a different BPE (another vocabulary, adds
    BOS, EOS <|eot_id|>). reward_scores on policy ids equals the RM scored on its own tokenization of the same
    text (+ its EOS where the completion had one), one row at a time; a completion without EOS is scored
    at its last token and then gets the missing-EOS score."""
    policy_path, _ = tiny_models.save_tiny(tmp_path, "gpt2")
    rm_tok = tiny_models.make_tokenizer("llama", vocab_size=300, seed=1)
    torch.manual_seed(1)
    rm = tiny_models.AutoModelForSequenceClassification.from_config(
        tiny_models.make_config("llama", rm_tok, num_labels=1)
    )
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.save_pretrained(tmp_path / "other-rm")
    rm_tok.save_pretrained(tmp_path / "other-rm")

    tok = data.load_tokenizer(policy_path)
    rm = common.load_model(str(tmp_path / "other-rm"), "reward", tokenizer=tok).eval()
    policy_tok, own = rm.retokenize
    assert policy_tok is tok and own.pad_token == "<|pad|>"
    texts = [
        (tldr_prompt(1), " My roommate is late."),
        ("\n\nHuman: Hi\n\nAssistant:", " Hello, how can I help?"),
        ("Hello", " there"),
    ]
    pairs = [data.tokenize_pair(tok, p, c, 256, 32) for p, c in texts]
    assert tok.encode(texts[0][1]) != own.encode(texts[0][1])  # the two tokenizations differ
    pairs[2] = (pairs[2][0], pairs[2][1][:-1])  # the last completion has no EOS
    prompt = data.pad([p for p, _ in pairs], tok.pad_token_id, "left")
    completion = data.pad([c for _, c in pairs], tok.pad_token_id, "right")
    has_eos = torch.tensor([True, True, False])
    with torch.no_grad():
        scores = common.reward_scores(rm, prompt, completion, tok.pad_token_id)
        penalized = common.reward_scores(rm, prompt, completion, tok.pad_token_id, has_eos, no_eos_score=-1.0)
        for i, (p, c) in enumerate(texts):
            ids = own(p + c)["input_ids"] + ([own.eos_token_id] if has_eos[i] else [])
            assert ids[0] == own.bos_token_id and ids.count(own.bos_token_id) == 1
            hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state
            direct = rm.score(hidden[0, -1]).squeeze()
            torch.testing.assert_close(scores[i], direct, atol=1e-5, rtol=0)
    assert penalized.tolist()[:2] == scores.tolist()[:2] and penalized[2].item() == -1.0


def test_split_dialogues_of_multi_turn_messages():
    """The prompt is every message the two dialogues share; each keeps its own continuation."""
    user, hi, bye = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    )
    chosen = [user, hi, bye, {"role": "assistant", "content": "Bye, take care."}]
    rejected = [user, hi, bye, {"role": "assistant", "content": "Whatever."}]
    assert data.split_dialogues(chosen, rejected) == ([user, hi, bye], chosen[3:], rejected[3:])
    assert data.split_dialogues(chosen, chosen) == ([user, hi, bye], chosen[3:], chosen[3:])  # a tie
    with pytest.raises(training.UserError, match="both be strings or both lists"):
        data.split_dialogues(chosen, "Whatever.")


def test_chat_template_whose_end_of_turn_is_not_the_eos(tmp_path):
    """A Qwen2 *base* tokenizer: ChatML turns end with <|im_end|>\\n, but its EOS is <|endoftext|>. The
    completion is the reply as the template writes it, then the EOS: the policy learns to close its turn
    and stop. A plain-text completion after a conversational prompt continues the rendered prompt."""
    tok = tiny_models.make_tokenizer("qwen2")
    tok.eos_token, tok.pad_token = "<|endoftext|>", None
    tok.save_pretrained(tmp_path)
    tok = data.load_tokenizer(str(tmp_path))
    user = [{"role": "user", "content": "Hi"}]
    prompt, completion = data.tokenize_pair(tok, user, [{"role": "assistant", "content": "Hello!"}], 64, 16)
    assert tok.decode(completion) == "Hello!<|im_end|>\n<|endoftext|>" and completion.count(tok.eos_token_id) == 1
    assert data.tokenize_pair(tok, user, "Hello!", 64, 16) == (prompt, completion[:-3] + [tok.eos_token_id])
