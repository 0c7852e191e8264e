"""Tests of the toy task (toy.py): the gold reward, the tokenizer, the datasets, the win rate and the
model configs. Expected values are computed by hand from the formula in toy.py's docstring:

    gold = clip(0.9*coverage + 0.1*order - 0.25*fillers - 0.5*hallucinated - 0.25*repeats - 0.5*[no EOS], -1, 1)
"""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import toy

# topic words rain, cat (in this order of first appearance); fillers very, then, so, maybe
POST2 = "POST: rain very cat then rain so cat maybe TL;DR:"
# three topic words exam, boss, rent; filler so
POST3 = "POST: exam boss exam so rent boss rent exam TL;DR:"


# ---------------------------------------------------------------------------------------------
# Gold reward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, completion, has_eos, expected",
    [
        (POST2, "rain cat", True, 1.0),  # ideal: 0.9*1 + 0.1*1
        (POST2, "rain", True, 0.55),  # half the topics: 0.9*0.5 + 0.1
        (POST2, "cat", True, 0.55),  # a single present topic word is trivially in order
        (POST2, "cat rain", True, 0.9),  # all topics, wrong order: 0.9 + 0
        (POST2, "rain cat very", True, 0.75),  # one filler: 1 - 0.25
        (POST2, "rain very cat very", True, 0.5),  # 1 distinct filler, 1 repeat: 1 - 0.25 - 0.25
        (POST2, "rain cat dog", True, 0.5),  # a topic word not in the post is hallucinated: 1 - 0.5
        (POST2, "rain cat xyz", True, 0.5),  # an unknown word is hallucinated too
        (POST2, "rain rain cat", True, 0.75),  # one repeat: 1 - 0.25
        (POST2, "rain cat", False, 0.5),  # ideal words but no EOS: 1 - 0.5
        (POST2, "", True, 0.0),  # empty: coverage 0, order 0
        (POST2, "", False, -0.5),
        (POST2, "dog car phone", True, -1.0),  # 3 hallucinated: -1.5 clipped to -1
        (POST2, "very very very very", True, -1.0),  # 1 filler + 3 repeats: -0.25 - 0.75
        (POST3, "exam boss rent", True, 1.0),
        (POST3, "exam boss", True, 0.7),  # the docstring's "drops the last of three": 0.9*2/3 + 0.1
        (POST3, "boss rent", True, 0.7),  # present topics in post order
        (POST3, "exam rent boss", True, 0.9),  # all three, out of order
    ],
)
def test_gold_reward_hand_values(prompt, completion, has_eos, expected):
    assert toy.gold_reward(prompt, completion, has_eos) == pytest.approx(expected, abs=1e-12)


def test_gold_reward_ignores_surrounding_whitespace():
    # completions are stored with a leading space (" rain cat"); decoded text has none
    assert toy.gold_reward(POST2, " rain cat") == toy.gold_reward(POST2, "rain cat") == pytest.approx(1.0)


def test_gold_reward_rejects_a_non_toy_prompt():
    with pytest.raises(ValueError):
        toy.gold_reward("rain very cat", "rain")


def test_gold_reward_stays_in_range():
    # random word salads (mostly junk) and toy candidates on the test posts never leave [-1, 1]
    rng = random.Random(0)
    words = toy.TOPIC_WORDS + toy.FILLER_WORDS + ["xyz"]
    for prompt in toy.sft_dataset("test")["prompt"][:200]:
        post = toy.post_words(prompt)
        candidates = [toy.candidate_summary(post, rng) for _ in range(5)]
        candidates += [rng.choices(words, k=rng.randint(0, 12)) for _ in range(5)]
        for c in candidates:
            for has_eos in (True, False):
                assert -1.0 <= toy.gold_reward(prompt, " ".join(c), has_eos) <= 1.0


def test_gold_ranks_ideal_above_references_above_junk():
    """On every test post the ideal scores 1; references are good but imperfect (they score 1 only when
    they equal the ideal); each kind of junk built from the ideal scores exactly its penalty below 1 and,
    on average, well below the references."""
    data = toy.sft_dataset("test")
    refs = []
    junk = {"hallucinated": [], "repeated": [], "filler_stuffed": [], "missing_eos": []}
    for prompt, ref in zip(data["prompt"], data["completion"]):
        post = toy.post_words(prompt)
        best = toy.ideal_summary(post)
        assert toy.gold_reward(prompt, " ".join(best)) == pytest.approx(1.0)
        refs.append(toy.gold_reward(prompt, ref))
        assert (refs[-1] == pytest.approx(1.0)) == (ref.split() == best)
        off_post = next(w for w in toy.TOPIC_WORDS if w not in post)
        fillers = [w for w in post if w not in toy.TOPIC_WORDS][:2]  # some posts have fewer than 2
        cases = {
            "hallucinated": (toy.gold_reward(prompt, " ".join(best + [off_post])), 1 - 0.5),
            "repeated": (toy.gold_reward(prompt, " ".join(best + best)), 1 - 0.25 * len(best)),
            "filler_stuffed": (toy.gold_reward(prompt, " ".join(best + fillers)), 1 - 0.25 * len(fillers)),
            "missing_eos": (toy.gold_reward(prompt, " ".join(best), has_eos=False), 1 - 0.5),
        }
        for kind, (gold, expected) in cases.items():
            assert gold == pytest.approx(expected), (kind, prompt)
            junk[kind].append(gold)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # references: the ideal ~30% of the time, else mostly a dropped last topic (0.55 or 0.7)
    assert 0.65 < mean(refs) < 0.8
    for kind, golds in junk.items():
        assert mean(golds) < mean(refs) - 0.15, kind


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_ids_by_hand():
    tok = toy.make_tokenizer()
    # VOCAB = <bos> <eos> <unk> POST: TL;DR: rain cat ... (12 topics, 28 fillers) <|pad|>: BOS is prepended like Llama
    assert tok("POST: rain cat TL;DR:")["input_ids"] == [0, 3, 5, 6, 4]
    assert tok("POST: rain xyz TL;DR:")["input_ids"] == [0, 3, 5, 2, 4]  # unknown word -> <unk>
    assert tok("very perhaps", add_special_tokens=False)["input_ids"] == [17, 44]  # first and last filler
    assert len(tok) == len(toy.VOCAB) == 5 + 12 + 28 + 1 == 46
    assert toy.VOCAB[-1] == "<|pad|>" and tok.convert_ids_to_tokens(45) == "<|pad|>"  # pad is the last id


def test_tokenizer_special_tokens_distinct():
    tok = toy.make_tokenizer()
    ids = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert ids == [45, 0, 1, 2] and len(set(ids)) == 4
    assert tok.pad_token_id == len(toy.VOCAB) - 1  # the last id: outside the model's vocabulary (see below)
    assert tok.padding_side == "left"


def test_tokenizer_round_trip():
    tok = toy.make_tokenizer()
    data = toy.sft_dataset("test")
    for text in data["prompt"][:100] + data["completion"][:100]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text.strip()
    assert tok.decode([0, 3, 5, 6, 4, 1]) == "<bos> POST: rain cat TL;DR: <eos>"


def test_tokenizer_save_and_reload(tmp_path):
    tok = toy.make_tokenizer()
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = toy.sft_dataset("test")["prompt"][:20] + ["POST: rain xyz TL;DR: rain cat <eos>"]
    a, b = tok(texts, padding=True), reloaded(texts, padding=True)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert a["input_ids"][0][0] == 45 and a["attention_mask"][0][0] == 0  # left padding survives the round trip
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "padding_side"):
        assert getattr(reloaded, name) == getattr(tok, name)


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return {
        ("sft", "train"): toy.sft_dataset("train"),
        ("sft", "test"): toy.sft_dataset("test"),
        ("pref", "train"): toy.preference_dataset("train"),
        ("pref", "test"): toy.preference_dataset("test"),
    }


def test_datasets_sizes_and_columns(splits):
    assert splits["sft", "train"].column_names == ["prompt", "completion"]
    assert splits["pref", "train"].column_names == ["prompt", "chosen", "rejected"]
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {
        ("sft", "train"): 20_000,
        ("sft", "test"): 1_000,
        ("pref", "train"): 10_000,
        ("pref", "test"): 1_000,
    }
    with pytest.raises(ValueError):
        toy.sft_dataset("validation")


def test_datasets_deterministic_from_seed(splits):
    assert toy.sft_dataset("train").to_dict() == splits["sft", "train"].to_dict()
    assert toy.preference_dataset("test").to_dict() == splits["pref", "test"].to_dict()
    assert toy.sft_dataset("test", seed=1)["prompt"] != splits["sft", "test"]["prompt"]


def test_no_test_post_in_any_train_split(splits):
    test_prompts = set(splits["sft", "test"]["prompt"]) | set(splits["pref", "test"]["prompt"])
    for kind in ("sft", "pref"):
        train_prompts = splits[kind, "train"]["prompt"]
        assert not test_prompts & set(train_prompts)
    assert len(set(splits["sft", "train"]["prompt"])) == 20_000  # distinct posts


def test_posts_follow_the_documented_shape(splits):
    for prompt in splits["sft", "test"]["prompt"]:
        post = toy.post_words(prompt)
        counts = {w: post.count(w) for w in post}
        topics = [w for w in counts if w in toy.TOPIC_WORDS]
        assert 8 <= len(post) <= 14
        assert len(topics) in (2, 3) and all(counts[w] in (2, 3) for w in topics)
        assert all(counts[w] == 1 for w in counts if w not in toy.TOPIC_WORDS)


def test_completions_have_a_leading_space(splits):
    for kind, cols in (("sft", ["completion"]), ("pref", ["chosen", "rejected"])):
        for col in cols:
            assert all(c.startswith(" ") for c in splits[kind, "test"][col])
    assert all(c != r for c, r in zip(splits["pref", "test"]["chosen"], splits["pref", "test"]["rejected"]))


def test_preference_labels_are_bradley_terry_draws_on_gold(splits):
    """P(chosen = gold-better) = sigmoid(|gold_a - gold_b| / 0.3). The observed agreement over the 10k
    train pairs must match the mean of these probabilities within 4 standard errors."""
    data = splits["pref", "train"]
    observed, expected = [], []
    for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"]):
        gc, gr = toy.gold_reward(p, c), toy.gold_reward(p, r)
        observed.append(1.0 if gc > gr else 0.5 if gc == gr else 0.0)
        expected.append(1 / (1 + math.exp(-abs(gc - gr) / toy.BT_TEMPERATURE)))
    n = len(observed)
    mean_obs, mean_exp = sum(observed) / n, sum(expected) / n
    stderr = math.sqrt(sum(q * (1 - q) for q in expected)) / n
    assert abs(mean_obs - mean_exp) < 4 * stderr
    assert 0.7 < mean_obs < 0.85  # noisy labels: a learned reward model cannot be perfect


# ---------------------------------------------------------------------------------------------
# Win rate and model configs
# ---------------------------------------------------------------------------------------------


def test_gold_is_a_reward_function_and_a_judge():
    """toy.gold has TRL's reward-function signature: the gold reward of each (prompt, completion), a missing EOS
    counted where `has_eos` says so; another task's prompt is refused."""
    prompt = toy.prompt_text(["rain", "very", "cat", "then", "rain", "so", "cat", "maybe"])
    assert toy.gold([prompt] * 2, [" rain cat", " rain"], answer=["unused"] * 2) == [1.0, pytest.approx(0.55)]
    assert toy.gold([prompt], [" rain cat"], has_eos=[False]) == [0.5]
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy.gold(["SUBREDDIT: r/cats TL;DR:"], [" a cat"])


def test_model_config_sizes():
    """Tied embeddings over the model's V = 45 tokens (the 46-word VOCAB less <|pad|>, which has no row):
    V*H + layers * (4*H*H attention + 3*H*I MLP + 2*H norms) + H final norm:
    "small" 45*128 + 4*262_400 + 128 = 1_055_488 (~1.06M, the default),
    "tiny" 45*64 + 2*41_088 + 64 = 85_120 (~0.085M, tests)."""
    V = len(toy.VOCAB) - 1
    for size, (H, L, inter), expected in (("small", (128, 4, 512), 1_055_488), ("tiny", (64, 2, 128), 85_120)):
        model = AutoModelForCausalLM.from_config(toy.model_config(size))
        n = sum(p.numel() for p in model.parameters())
        assert n == V * H + L * (4 * H * H + 3 * H * inter + 2 * H) + H == expected
        assert model.get_input_embeddings().weight.shape == (45, H)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied


def test_model_config_matches_tokenizer():
    """Every token but <|pad|> has a row; the pad id (45) lies outside the 45-row vocabulary, like a pad token
    added to a real tokenizer without resizing the embeddings, so the model can never emit it."""
    tok, config = toy.make_tokenizer(), toy.model_config()
    assert config.vocab_size == len(tok) - 1 == 45
    assert tok.pad_token_id == config.vocab_size and config.pad_token_id is None
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert all(i < config.vocab_size for w, i in tok.get_vocab().items() if w != "<|pad|>")
    assert config.attention_dropout == 0.0
    # prompts (<= 16 tokens) plus MAX_NEW_TOKENS fit the position table
    assert (
        max(len(tok(p)["input_ids"]) for p in toy.sft_dataset("test")["prompt"]) + toy.MAX_NEW_TOKENS
        <= config.max_position_embeddings
    )
    model = AutoModelForCausalLM.from_config(config)
    logits = model(torch.tensor([[0, 3, 5, 4]])).logits  # "<bos> POST: rain TL;DR:"
    assert logits.shape == (1, 4, 45)  # no logit for <|pad|>
    with pytest.raises(IndexError):  # and no embedding row: common.forward() never embeds it
        model(torch.tensor([[tok.pad_token_id, 0, 3, 5, 4]]))
