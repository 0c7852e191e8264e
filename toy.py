"""The built-in toy task: "the CartPole of RLHF".

A miniature of the TL;DR summarization setup, small enough to train SFT -> reward model -> RL on a
laptop CPU in a few minutes, with a programmatic judge so that every result can be checked.

The world
---------
A *post* is a short sequence of readable words. Two or three **topic words** (from a fixed set of
12 nouns) each occur two or three times; the rest of the post is **filler** words (from a fixed set
of 28), each at most once. Importance is lexical (topic nouns matter) and also shows as repetition.

    prompt:      "POST: rain very cat then rain so cat maybe TL;DR:"
    ideal:       " rain cat"              (topic words in order of first appearance, then EOS)

**Reference summaries** (the demonstrations: SFT data, DR-PO's reset source, AIHF's demonstrations)
are good but imperfect, with a systematic human habit that greedy SFT inherits: they stop one word
early (drop the last topic word) with probability 0.7, and carry independent noise (insert a filler
from the post: 0.1, swap two neighbours: 0.1). RL therefore has clear headroom over SFT.

**Gold reward** (plays the human / GPT-4 judge; dense; range [-1, 1]):

    gold = clip(0.9*coverage + 0.1*order - 0.25*fillers - 0.5*hallucinated - 0.25*repeats
                - 0.5*[no EOS], -1, 1)

    coverage      share of the post's topic words present in the summary
    order         1 if the topic words present appear in the post's first-appearance order, else 0
                  (0 when none is present)
    fillers       number of distinct post words in the summary that are not topic words
    hallucinated  number of distinct summary words that are not in the post (unknown words included)
    repeats       number of summary words that repeat an earlier one

The ideal summary scores 1.0; a reference that drops the last of three topic words scores 0.7.

**Preference pairs** (reward-model and DPO data) compare two candidate summaries of one post, drawn
from a mix of reference-like summaries (near what an SFT policy samples) and broader corruptions,
labelled by a noisy Bradley-Terry draw on the gold reward, P(a > b) = sigmoid((gold_a - gold_b) / 0.3),
so that a learned reward model is imperfect, as with human labels.

The main metric mirrors the papers' GPT-4 win rate against human references: the **win rate against
the reference summaries under the gold reward** (ties count one half).

Everything is generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

TOPIC_WORDS = ["rain", "cat", "train", "bank", "party", "exam", "boss", "rent", "dog", "car", "phone", "trip"]
FILLER_WORDS = (
    "very then so maybe really just also today again still quite often soon later never always here there now well "
    "okay anyway though like yet even almost perhaps"
).split()
PROMPT_HEAD, PROMPT_TAIL = "POST:", "TL;DR:"
# <|pad|> comes last and lies outside the model's vocabulary (as the pad token common.load_tokenizer adds to a real
# tokenizer without resizing the embeddings): the model can never emit it, and common.forward() never embeds it.
VOCAB = ["<bos>", "<eos>", "<unk>", PROMPT_HEAD, PROMPT_TAIL] + TOPIC_WORDS + FILLER_WORDS + ["<|pad|>"]

# Sizes of the fixed splits (seed 0). SFT: 1 epoch at batch 64 is ~310 steps.
SFT_TRAIN, SFT_TEST = 20_000, 1_000
PREF_TRAIN, PREF_TEST = 10_000, 1_000
BT_TEMPERATURE = 0.3  # Bradley-Terry temperature of the simulated labellers
MAX_NEW_TOKENS = 8  # enough for the ideal summary (<= 3 words + EOS) plus room to ramble


def make_tokenizer(extra_words: int = 0, pad: bool = True, tier: str = "toy") -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB; prepends <bos> like Llama; pad, bos, eos and unk are distinct.
    `extra_words` unused words w0, w1, ... follow <|pad|> (a real-sized vocabulary for speed measurements).
    `pad=False`: without <|pad|>, EOS as pad (a saved toy model's tokenizer: every id has an embedding row)."""
    vocab = LONG_VOCAB if tier == "toy-long" else VOCAB
    words = (vocab if pad else vocab[:-1]) + [f"w{i}" for i in range(extra_words)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>" if pad else "<eos>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=128 if tier == "toy-long" else 64,
    )


def model_config(size: str = "small", tier: str = "toy") -> LlamaConfig:
    """Llama-style causal-LM config: "small" ~1.05M parameters (the default), "tiny" ~0.1M (tests)."""
    hidden, layers, inter = {"small": (128, 4, 512), "tiny": (64, 2, 128)}[size]
    return LlamaConfig(
        vocab_size=len(LONG_VOCAB if tier == "toy-long" else VOCAB) - 1,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128 if tier == "toy-long" else 64,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=1,
        attention_dropout=0.0,
    )


# ---------------------------------------------------------------------------------------------
# The world: posts, ideal and reference summaries, gold reward
# ---------------------------------------------------------------------------------------------


def make_post(rng: random.Random) -> list[str]:
    """2-3 topic words occurring 2-3 times each, shuffled among distinct fillers; 8-14 words."""
    topics = rng.sample(TOPIC_WORDS, rng.choice([2, 3]))
    words = [w for w in topics for _ in range(rng.choice([2, 3]))]
    n_fill = rng.randint(max(0, 8 - len(words)), 14 - len(words))
    words += rng.sample(FILLER_WORDS, n_fill)
    rng.shuffle(words)
    return words


def prompt_text(post: list[str]) -> str:
    return f"{PROMPT_HEAD} {' '.join(post)} {PROMPT_TAIL}"


def post_words(prompt: str) -> list[str]:
    """Inverse of prompt_text (tolerates surrounding whitespace)."""
    words = prompt.split()
    if len(words) < 2 or words[0] != PROMPT_HEAD or words[-1] != PROMPT_TAIL:
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return words[1:-1]


def topic_words(post: list[str]) -> list[str]:
    """The post's important words, in order of first appearance."""
    return list(dict.fromkeys(w for w in post if w in TOPIC_WORDS))


def ideal_summary(post: list[str]) -> list[str]:
    return topic_words(post)


def reference_summary(post: list[str], rng: random.Random) -> list[str]:
    """The human habit: stop one word early (p=0.7); insert a post filler (0.1); swap neighbours (0.1)."""
    words = ideal_summary(post)
    if len(words) >= 2 and rng.random() < 0.7:
        words = words[:-1]
    fillers = [w for w in post if w not in TOPIC_WORDS]
    if fillers and rng.random() < 0.1:
        words.insert(rng.randint(0, len(words)), rng.choice(fillers))
    if len(words) >= 2 and rng.random() < 0.1:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def gold_reward(prompt: str, completion: str, has_eos: bool = True) -> float:
    """The programmatic judge (see the module docstring). `completion` is decoded text without EOS."""
    post = post_words(prompt)
    if TITLE in post:
        return long_gold_reward(post, completion, has_eos)
    important = topic_words(post)
    words = completion.split()
    present = [w for w in dict.fromkeys(words) if w in important]
    coverage = len(present) / len(important)
    order = float(bool(present) and present == [w for w in important if w in present])
    fillers = len({w for w in words if w in post and w not in important})
    hallucinated = len({w for w in words if w not in post})
    repeats = len(words) - len(set(words))
    score = 0.9 * coverage + 0.1 * order - 0.25 * fillers - 0.5 * hallucinated - 0.25 * repeats - 0.5 * (not has_eos)
    return max(-1.0, min(1.0, score))


def gold(prompts: list[str], completions: list[str], has_eos: list[bool] | None = None, **columns) -> list[float]:
    """The gold reward with TRL's reward-function signature: the toy's judge (`--judge toy:gold`: win rate against
    the references) and a reward function (`--reward-fn toy:gold`: the oracle). A completion that `has_eos` says
    never ended loses 0.5. Any other task's prompts are refused (ValueError)."""
    ended = [True] * len(completions) if has_eos is None else has_eos
    return [gold_reward(p, c, bool(e)) for p, c, e in zip(prompts, completions, ended, strict=True)]


def skill_rates(samples: list[dict], sampled: list[str]) -> dict[str, float]:
    """toy-long's skill rates: the share of greedy completions (`samples`, {"prompt", "completion"}) that have each
    of long_skills' parts (eval/title, eval/mood), and of `sampled` ones at temperature 1 (eval/title_t1, ...)."""
    metrics = {}
    for how, texts in (("", [s["completion"] for s in samples]), ("_t1", sampled)):
        skills = [long_skills(post_words(s["prompt"]), t) for s, t in zip(samples, texts, strict=True)]
        metrics |= {f"eval/{part}{how}": sum(k[part] for k in skills) / len(skills) for part in ("title", "mood")}
    return metrics


# ---------------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------------


def candidate_summary(post: list[str], rng: random.Random) -> list[str]:
    """A candidate summary: reference-like half the time (near what SFT samples), else a broader corruption."""
    if rng.random() < 0.5:
        return reference_summary(post, rng)
    words = [w for w in ideal_summary(post) if rng.random() > 0.25]
    if words and rng.random() < 0.4:
        words = words[:-1]
    fillers = [w for w in post if w not in TOPIC_WORDS]
    for _ in range(rng.choice([0, 0, 1, 2])):
        if fillers:
            words.insert(rng.randint(0, len(words)), rng.choice(fillers))
    if rng.random() < 0.2:  # hallucinate a word that is not in the post
        words.insert(rng.randint(0, len(words)), rng.choice([w for w in TOPIC_WORDS + FILLER_WORDS if w not in post]))
    if words and rng.random() < 0.2:
        words.insert(rng.randint(0, len(words)), rng.choice(words))
    if len(words) >= 2 and rng.random() < 0.2:
        rng.shuffle(words)
    return words[: MAX_NEW_TOKENS - 1]


def _completion(words: list[str]) -> str:
    return " " + " ".join(words)


def make_preference_pair(post: list[str], rng: random.Random) -> dict:
    """Two different candidates labelled by a Bradley-Terry draw on the gold reward (EOS is appended at
    tokenization, as for every dataset in the standard format)."""
    prompt = prompt_text(post)
    candidate = long_candidate_summary if TITLE in post else candidate_summary
    a, b = candidate(post, rng), candidate(post, rng)
    while b == a:  # identical strings carry no preference
        b = candidate(post, rng)
    ga, gb = gold_reward(prompt, " ".join(a)), gold_reward(prompt, " ".join(b))
    temperature = LONG_BT_TEMPERATURE if TITLE in post else BT_TEMPERATURE
    if rng.random() < 1 / (1 + math.exp(-(ga - gb) / temperature)):
        return {"prompt": prompt, "chosen": _completion(a), "rejected": _completion(b)}
    return {"prompt": prompt, "chosen": _completion(b), "rejected": _completion(a)}


# ---------------------------------------------------------------------------------------------
# Datasets (standard columns)
# ---------------------------------------------------------------------------------------------


def sft_dataset(split: str = "train", seed: int = 0, tier: str = "toy") -> datasets.Dataset:
    """prompt / completion: reference summaries of distinct posts. Test posts never occur in train."""
    reference = long_reference_summary if tier == "toy-long" else reference_summary
    row = lambda post, rng: {"prompt": prompt_text(post), "completion": _completion(reference(post, rng))}  # noqa: E731
    return _split(split, seed, row, LONG_SFT_TRAIN if tier == "toy-long" else SFT_TRAIN, SFT_TEST, salt=1, tier=tier)


def preference_dataset(split: str = "train", seed: int = 0, tier: str = "toy") -> datasets.Dataset:
    """prompt / chosen / rejected with noisy Bradley-Terry labels on the gold reward."""
    n_train = LONG_PREF_TRAIN if tier == "toy-long" else PREF_TRAIN
    return _split(split, seed, make_preference_pair, n_train, PREF_TEST, salt=2, tier=tier)


def _split(split, seed, make_row, n_train, n_test, salt, tier="toy"):
    if split not in ("train", "test"):
        raise ValueError(f"toy splits are 'train' and 'test', not {split!r}")
    rng = random.Random(seed * 1000 + salt)
    new_post = make_long_post if tier == "toy-long" else make_post
    test_posts = _distinct_posts(random.Random(seed * 1000), max(SFT_TEST, PREF_TEST), set(), new_post)
    if split == "test":
        posts = test_posts[:n_test]
    else:
        posts = _distinct_posts(rng, n_train, {tuple(p) for p in test_posts}, new_post)
    row_rng = random.Random(seed * 1000 + salt + 100 * (split == "test"))
    return datasets.Dataset.from_list([make_row(post, row_rng) for post in posts])


def _distinct_posts(rng, n, exclude, new_post):
    posts, seen = [], set(exclude)
    while len(posts) < n:
        post = new_post(rng)
        if tuple(post) in seen:
            continue
        seen.add(tuple(post))
        posts.append(post)
    return posts


# ---------------------------------------------------------------------------------------------
# The long tier, `--dataset toy-long`: a long horizon, a skill SFT rarely completes, a part no data shows
# ---------------------------------------------------------------------------------------------
# A post has 3-4 topic words, one mood word and fillers, then its title: "TITLE:", a main title of 3-8 names, "-" and
# a subtitle of the rest of 12 names. The ideal summary (18-19 tokens, then EOS) quotes the whole title, then gives
# the topics in order and the mood:
#     " TITLE: maple cedar birch - aspen ... (12 names) rain cat bank tired"
# gold = 0.45 * (0.9 coverage + 0.1 order)      topics, as in the short tier
#      + 0.40 * [the whole title, exactly]        the skill: a word missing, wrong or out of place loses it all
#      + 0.15 * [the post's mood word]            the part to explore: no data shows it
#      - 0.1 fillers - 0.2 hallucinated - 0.1 repeats - 0.5 [no EOS], clipped to [-1, 1]
# where a name counts only through the title (a slip in a quote spoils the quote, it is not charged again).
# References (the SFT data, AIHF's demonstrations) quote the title the way people quote a long one: the main title
# mostly, the whole title in FULL_RATE of posts; then the topics, the last one left out in 70% as in the short tier.
# Every reference quotes, so that SFT learns the copy within a few hundred updates (a copy in fewer demonstrations
# forms later, at some seeds not within 800 updates). After the main title the SFT policy writes "-" about as often as
# the references do, and from there it copies the rest: the skill is one rare step away. The preference candidates
# quote the whole title more often, so the chosen summaries (DR-PO's reset source on this tier) show it about five
# times as often as the demonstrations. No candidate names the mood, so neither the reset source nor a reward model
# learned from the pairs knows what it is worth: only an online judge that does (the gold reward, `--reward-model
# toy-long-gold`) pays a policy for finding it, as XPO's labeller pays for responses the reference policy rarely
# gives. Candidates carry the slips an SFT policy's samples make (a wrong name, a topic word not in the post, a word
# said twice), so that a reward model learns to order those samples; the labellers are surer than the short tier's
# (temperature 0.1 against 0.3), as the tier's gold differences are about a third as large.

TITLE, BREAK = "TITLE:", "-"
NAME_WORDS = (
    "maple cedar birch aspen willow alder hazel rowan spruce larch elm oak pine fir yew ash lime poplar holly "
    "laurel myrtle juniper cypress sequoia acacia baobab banyan mango olive lemon cherry plum peach apricot quince "
    "fig date walnut almond pecan cashew acorn chestnut hickory sumac tupelo sassafras"
).split()
MOOD_WORDS = "happy sad angry calm tired proud bored scared".split()
LONG_VOCAB = VOCAB[:-1] + [TITLE, BREAK] + NAME_WORDS + MOOD_WORDS + ["<|pad|>"]
TITLE_LEN, FULL_RATE = 12, 0.06
LONG_SFT_TRAIN = 38_400  # 1,200 SFT updates of 32: the title copy forms after 200-900, when depends on seed and machine
LONG_MAX_NEW_TOKENS = 48
LONG_PREF_TRAIN = 12_000  # 187 reward-model updates of 64
LONG_BT_TEMPERATURE = 0.1  # the tier's gold differences are about a third of the short tier's


def make_long_post(rng: random.Random) -> list[str]:
    """3-4 topic words occurring 2-3 times, one mood word and distinct fillers (16-22 words), then TITLE: and 12
    distinct names with "-" after the first 3-8."""
    topics = rng.sample(TOPIC_WORDS, rng.choice([3, 4]))
    body = [w for w in topics for _ in range(rng.choice([2, 3]))] + [rng.choice(MOOD_WORDS)]
    body += rng.sample(FILLER_WORDS, rng.randint(max(0, 16 - len(body)), 22 - len(body)))
    rng.shuffle(body)
    names, main = rng.sample(NAME_WORDS, TITLE_LEN), rng.randint(3, 8)
    return [*body, TITLE, *names[:main], BREAK, *names[main:]]


def long_parts(post: list[str]) -> tuple[list[str], list[str], str]:
    """(title with its "-", topic words in order of first appearance, mood word) of a long-tier post."""
    return post[post.index(TITLE) + 1 :], topic_words(post), next(w for w in post if w in MOOD_WORDS)


def main_title(title: list[str]) -> list[str]:
    """The part of a title before its "-"."""
    return title[: title.index(BREAK)]


def long_ideal_summary(post: list[str]) -> list[str]:
    title, topics, mood = long_parts(post)
    return [TITLE, *title, *topics, mood]


def long_reference_summary(post: list[str], rng: random.Random) -> list[str]:
    """A quote of the title (the main title, or the whole title in FULL_RATE of posts), then the topics in order,
    the last one left out in 70% (the short tier's habit of stopping a word early, without its rarer slips); never
    the mood. A greedy SFT policy says what most references say, so it ties most of them and loses to the rest."""
    title, topics, _ = long_parts(post)
    words = topics[:-1] if rng.random() < 0.7 else topics
    return [TITLE, *(title if rng.random() < FULL_RATE else main_title(title)), *words]


def long_skills(post: list[str], completion: str) -> dict[str, float]:
    """Which of the long tier's two hard parts a summary has: the whole title, exactly (the skill) and the mood
    (the part no data shows). Every script's evaluation logs their rates, greedy and at temperature 1."""
    title, _, mood = long_parts(post)
    words, n = completion.split(), len(title)
    return {
        "title": float(any(words[i : i + n] == title for i in range(len(words) - n + 1))),
        "mood": float(mood in words),
    }


def long_gold_reward(post: list[str], completion: str, has_eos: bool = True) -> float:
    title, topics, mood = long_parts(post)
    words = completion.split()
    present = [w for w in dict.fromkeys(words) if w in topics]
    coverage = len(present) / len(topics)
    order = float(bool(present) and present == [w for w in topics if w in present])
    fillers = len({w for w in words if w in post and w not in topics and w not in title and w not in (mood, TITLE)})
    others = [w for w in words if w not in NAME_WORDS]  # a name counts only through the title: a slip spoils it
    hallucinated = len({w for w in others if w not in post})
    repeats = len(others) - len(set(others))
    score = (
        0.45 * (0.9 * coverage + 0.1 * order) + 0.4 * long_skills(post, completion)["title"] + 0.15 * (mood in words)
    )
    score -= 0.1 * fillers + 0.2 * hallucinated + 0.1 * repeats + 0.5 * (not has_eos)
    return max(-1.0, min(1.0, score))


def copy_slips(words: list[str], post: list[str], rng: random.Random) -> list[str]:
    """The slips of a hurried copy of a title, as an SFT policy makes them: in half the quotes, 1-3 names become
    another name (not in the post: 0.7, else another of the quote's, a repeat)."""
    quoted = [i for i, w in enumerate(words) if w in NAME_WORDS]
    if not quoted or rng.random() < 0.5:
        return words
    words, absent = list(words), [w for w in NAME_WORDS if w not in post]
    for i in rng.sample(quoted, min(len(quoted), rng.randint(1, 3))):
        words[i] = rng.choice(absent) if rng.random() < 0.7 else words[rng.choice(quoted)]
    return words


def body_slips(words: list[str], post: list[str], rng: random.Random) -> list[str]:
    """The other slips of a sampled summary: in half of them a topic word that is not in the post (in place of one
    of the summary's words, or added), in a quarter a word said twice."""
    words, absent = list(words), [w for w in TOPIC_WORDS if w not in post]
    tail = [i for i, w in enumerate(words) if w not in NAME_WORDS and w != TITLE]
    if rng.random() < 0.5:
        if tail and rng.random() < 0.5:
            words[rng.choice(tail)] = rng.choice(absent)
        else:
            words.insert(rng.randint(len(words) - len(tail), len(words)), rng.choice(absent))
    tail = [i for i, w in enumerate(words) if w not in NAME_WORDS and w != TITLE]
    if tail and rng.random() < 0.25:
        i = rng.choice(tail)
        words.insert(i, words[i])
    return words


def long_candidate_summary(post: list[str], rng: random.Random) -> list[str]:
    """Reference-like half the time; else broad: corrupted topics after the whole title (0.9), the main title
    (0.05) or none. Never the mood. Then the slips of a sampled summary (copy_slips, body_slips), so that the pairs
    show what an SFT policy's samples get wrong."""
    if rng.random() < 0.5:
        words = long_reference_summary(post, rng)
    else:
        title = long_parts(post)[0]
        words = candidate_summary([w for w in post if w in TOPIC_WORDS or w in FILLER_WORDS], rng)
        quote = rng.random()
        words = ([TITLE, *title] if quote < 0.9 else [TITLE, *main_title(title)] if quote < 0.95 else []) + words
    return body_slips(copy_slips(words, post, rng), post, rng)[: LONG_MAX_NEW_TOKENS - 1]


def skill_pairs(split: str = "test", seed: int = 0) -> datasets.Dataset:
    """Pairs of long-tier summaries that differ only in the skill: the same reference topics after the whole title
    (chosen) or after the main title (rejected). A reward model must order them like the gold reward."""
    rng = random.Random(seed * 1000 + 7)
    pairs = []
    for prompt in sft_dataset(split, seed, tier="toy-long")["prompt"]:
        post = post_words(prompt)
        title, topics = long_parts(post)[:2]
        tail = reference_summary(topics, rng)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": _completion([TITLE, *title, *tail]),
                "rejected": _completion([TITLE, *main_title(title), *tail]),
            }
        )
    return datasets.Dataset.from_list(pairs)


def _long_tier_check(model: str, n: int):
    """(path, tokenizer, the first `n` test prompts) for a premise check of a long-tier model; a clear error for `n`
    outside the test posts or a model whose tokenizer lacks the tier's words."""
    import data

    if not 1 <= n <= SFT_TEST:
        raise ValueError(f"n must be 1-{SFT_TEST} (the tier's test posts), not {n}")
    path = resolve_model(model)
    tokenizer = data.load_tokenizer(path)
    if BREAK not in tokenizer.get_vocab():
        raise ValueError(f"{model} is not a long-tier model: its tokenizer has no {BREAK!r}")
    return path, tokenizer, sft_dataset("test", tier="toy-long")["prompt"][:n]


def title_after_reset(model: str = "toy-long-sft", n: int = 400, seed: int = 0) -> dict[str, float]:
    """DR-PO's premise, measured on a long-tier policy (a path, or `toy-long-sft`) over the first `n` test posts:
    `dash`, its mean probability of "-" right after the main title (the step to the whole title), `first`, that of
    the subtitle's first word right after the "-", and `finish`, the share of its temperature-1 samples that finish
    the whole title when they start just past the "-" (as after a reset into a chosen summary that quotes it).
        python -c "import toy; print(toy.title_after_reset())"
    """
    import torch

    import common
    import data

    torch.manual_seed(seed)
    path, tokenizer, prompts = _long_tier_check(model, n)
    policy = common.load_model(path, frozen=True)
    titles = [long_parts(post_words(p))[0] for p in prompts]
    starts = [[TITLE, *t[: t.index(BREAK) + 1]] for t in titles]  # the quote up to and with its "-"
    ids = [
        data.tokenize_prompts(tokenizer, [p], 64)[0] + tokenizer(" ".join(w), add_special_tokens=False)["input_ids"]
        for p, w in zip(prompts, starts)
    ]
    x = data.pad(ids, tokenizer.pad_token_id, "left")
    with torch.no_grad():  # position -2 has just written the main title, -1 the "-"
        probs = common.forward(policy, x, tokenizer.pad_token_id).logits[:, -2:].float().softmax(-1)
    dash = probs[:, 0, tokenizer.convert_tokens_to_ids(BREAK)].mean().item()
    firsts = tokenizer.convert_tokens_to_ids([t[t.index(BREAK) + 1] for t in titles])
    first = probs[torch.arange(n), 1, torch.tensor(firsts)].mean().item()
    completion, _ = common.generate(policy, x, tokenizer, LONG_MAX_NEW_TOKENS, temperature=1.0)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    done = [long_skills(post_words(p), " ".join([*w, t]))["title"] for p, w, t in zip(prompts, starts, texts)]
    return {"dash": dash, "first": first, "finish": sum(done) / n}


def mood_scores(model: str = "toy-long-rm", n: int = 500) -> dict[str, float]:
    """What a long-tier reward model (a path, or `toy-long-rm`) learned of the mood, which no preference pair names:
    over the first `n` test posts, the share where it scores the ideal summary above the same summary without its
    mood word (the gold reward: always, by 0.15), and its mean score of each.
        python -c "import toy; print(toy.mood_scores())"
    """
    import torch

    import common
    import data

    path, tokenizer, prompts = _long_tier_check(model, n)
    reward_model = common.load_model(path, "reward", tokenizer=tokenizer, frozen=True)
    prompt = data.pad(data.tokenize_prompts(tokenizer, prompts, 64), tokenizer.pad_token_id, "left")
    ideal = [long_ideal_summary(post_words(p)) for p in prompts]

    def score(summaries):
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        ids = [tokenizer(" ".join(w), add_special_tokens=False)["input_ids"] + [eos] for w in summaries]
        with torch.no_grad():
            return common.reward_scores(reward_model, prompt, data.pad(ids, pad, "right"), pad)

    with_mood, without = score(ideal), score([w[:-1] for w in ideal])  # the mood is the ideal summary's last word
    return {
        "prefers_mood": (with_mood > without).float().mean().item(),
        "with": with_mood.mean().item(),
        "without": without.mean().item(),
    }


TIERS = ("toy", "toy-long")  # the tiers, as --dataset names them


# ---- the cached toy models: `--model toy-sft`, `--reward-model toy-rm` ----


HERE = Path(__file__).resolve().parent


def toy_cache() -> Path:
    """Where the toy SFT and reward models are built on first use: $RLHF_TOY_CACHE or ./toy_cache."""
    return Path(os.environ.get("RLHF_TOY_CACHE", HERE / "toy_cache"))


def resolve_model(name: str) -> str:
    """`toy-sft` / `toy-rm` (`toy-long-sft` / `toy-long-rm`) -> the cached toy models, built on first use by sft.py /
    reward.py (with `--dataset toy-long`); else `name`."""
    if name not in ("toy-sft", "toy-rm", "toy-long-sft", "toy-long-rm"):
        return name
    cache, path = toy_cache(), toy_cache() / name
    if (path / "model.safetensors").exists():
        return str(path)
    long = name.startswith("toy-long")
    if name.endswith("-rm"):  # the reward model starts from the SFT model (built first, outside our lock)
        resolve_model("toy-long-sft" if long else "toy-sft")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # several processes may ask at once (tests, benchmark)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").exists():
            script = "reward.py" if name.endswith("-rm") else "sft.py"
            print(f"[toy] {name} not found in {cache}: building it with `python {script}` (once)", flush=True)
            tmp = cache / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, str(HERE / script), "--output-dir", str(cache), "--run-name", tmp.name]
            cmd += ["--dataset", "toy-long"] if long else []
            subprocess.run(cmd, check=True)
            tmp.rename(path)
    return str(path)


def gold_scores(prompt, completion, tier: str = "toy"):
    """gold_reward of each (prompt, completion) of token ids (toy tokenizer): `--reward-model toy-gold`, the oracle
    that separates an optimizer's quality from reward-model error."""
    import torch

    tokenizer = _tokenizer(tier)
    prompts = tokenizer.batch_decode(prompt, skip_special_tokens=True)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    has_eos = (completion == tokenizer.eos_token_id).any(1).tolist()
    return torch.tensor([gold_reward(p, t, e) for p, t, e in zip(prompts, texts, has_eos)])


@functools.cache
def _tokenizer(tier: str):
    return make_tokenizer(tier=tier)
