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
FILLER_WORDS = [
    "very",
    "then",
    "so",
    "maybe",
    "really",
    "just",
    "also",
    "today",
    "again",
    "still",
    "quite",
    "often",
    "soon",
    "later",
    "never",
    "always",
    "here",
    "there",
    "now",
    "well",
    "okay",
    "anyway",
    "though",
    "like",
    "yet",
    "even",
    "almost",
    "perhaps",
]
PROMPT_HEAD, PROMPT_TAIL = "POST:", "TL;DR:"
# <|pad|> comes last and lies outside the model's vocabulary (as the pad token common.load_tokenizer adds to a real
# tokenizer without resizing the embeddings): the model can never emit it, and common.forward() never embeds it.
VOCAB = ["<bos>", "<eos>", "<unk>", PROMPT_HEAD, PROMPT_TAIL] + TOPIC_WORDS + FILLER_WORDS + ["<|pad|>"]

# Sizes of the fixed splits (seed 0). SFT: 1 epoch at batch 64 is ~310 steps.
SFT_TRAIN, SFT_TEST = 20_000, 1_000
PREF_TRAIN, PREF_TEST = 10_000, 1_000
BT_TEMPERATURE = 0.3  # Bradley-Terry temperature of the simulated labellers
MAX_NEW_TOKENS = 8  # enough for the ideal summary (<= 3 words + EOS) plus room to ramble


def make_tokenizer(extra_words: int = 0, pad: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB; prepends <bos> like Llama; pad, bos, eos and unk are distinct.
    `extra_words` unused words w0, w1, ... follow <|pad|> (a real-sized vocabulary for speed measurements).
    `pad=False`: without <|pad|>, EOS as pad (a saved toy model's tokenizer: every id has an embedding row)."""
    words = (VOCAB if pad else VOCAB[:-1]) + [f"w{i}" for i in range(extra_words)]
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
        model_max_length=64,
    )


def model_config(size: str = "small") -> LlamaConfig:
    """Llama-style causal-LM config: "small" ~1.05M parameters (the default), "tiny" ~0.1M (tests)."""
    hidden, layers, inter = {"small": (128, 4, 512), "tiny": (64, 2, 128)}[size]
    return LlamaConfig(
        vocab_size=len(VOCAB) - 1,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
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


def win_rate(policy_golds: list[float], reference_golds: list[float]) -> float:
    """Share of prompts where the policy's summary beats the reference under the gold reward (ties 0.5)."""
    wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_golds, reference_golds, strict=True)]
    return sum(wins) / len(wins)


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
    a, b = candidate_summary(post, rng), candidate_summary(post, rng)
    while b == a:  # identical strings carry no preference
        b = candidate_summary(post, rng)
    ga, gb = gold_reward(prompt, " ".join(a)), gold_reward(prompt, " ".join(b))
    if rng.random() < 1 / (1 + math.exp(-(ga - gb) / BT_TEMPERATURE)):
        return {"prompt": prompt, "chosen": _completion(a), "rejected": _completion(b)}
    return {"prompt": prompt, "chosen": _completion(b), "rejected": _completion(a)}


# ---------------------------------------------------------------------------------------------
# Datasets (standard columns)
# ---------------------------------------------------------------------------------------------


def sft_dataset(split: str = "train", seed: int = 0) -> datasets.Dataset:
    """prompt / completion: reference summaries of distinct posts. Test posts never occur in train."""
    return _split(
        split,
        seed,
        lambda post, rng: {"prompt": prompt_text(post), "completion": _completion(reference_summary(post, rng))},
        SFT_TRAIN,
        SFT_TEST,
        salt=1,
    )


def preference_dataset(split: str = "train", seed: int = 0) -> datasets.Dataset:
    """prompt / chosen / rejected with noisy Bradley-Terry labels on the gold reward."""
    return _split(split, seed, make_preference_pair, PREF_TRAIN, PREF_TEST, salt=2)


def _split(split, seed, make_row, n_train, n_test, salt):
    if split not in ("train", "test"):
        raise ValueError(f"toy splits are 'train' and 'test', not {split!r}")
    rng = random.Random(seed * 1000 + salt)
    test_posts = _distinct_posts(random.Random(seed * 1000), max(SFT_TEST, PREF_TEST), exclude=set())
    if split == "test":
        posts = test_posts[:n_test]
    else:
        posts = _distinct_posts(rng, n_train, exclude={tuple(p) for p in test_posts})
    row_rng = random.Random(seed * 1000 + salt + 100 * (split == "test"))
    return datasets.Dataset.from_list([make_row(post, row_rng) for post in posts])


def _distinct_posts(rng, n, exclude):
    posts, seen = [], set(exclude)
    while len(posts) < n:
        post = make_post(rng)
        if tuple(post) in seen:
            continue
        seen.add(tuple(post))
        posts.append(post)
    return posts


# ---- the cached toy models: `--model toy-sft`, `--reward-model toy-rm` ----


HERE = Path(__file__).resolve().parent


def toy_cache() -> Path:
    """Where the toy SFT and reward models are built on first use: $RLHF_TOY_CACHE or ./toy_cache."""
    return Path(os.environ.get("RLHF_TOY_CACHE", HERE / "toy_cache"))


def resolve_model(name: str) -> str:
    """`toy-sft` / `toy-rm` -> the cached toy models, built on first use by sft.py / reward.py; else `name`."""
    if name not in ("toy-sft", "toy-rm"):
        return name
    cache, path = toy_cache(), toy_cache() / name
    if (path / "model.safetensors").exists():
        return str(path)
    if name == "toy-rm":
        resolve_model("toy-sft")  # the reward model starts from the SFT model (built first, outside our lock)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # several processes may ask at once (tests, benchmark)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").exists():
            script = {"toy-sft": "sft.py", "toy-rm": "reward.py"}[name]
            print(f"[toy] {name} not found in {cache}: building it with `python {script}` (once)", flush=True)
            tmp = cache / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, str(HERE / script), "--output-dir", str(cache), "--run-name", tmp.name]
            subprocess.run(cmd, check=True)
            tmp.rename(path)
    return str(path)


def gold_scores(prompt, completion):
    """gold_reward of each (prompt, completion) of token ids (toy tokenizer): `--reward-model toy-gold`, the oracle
    that separates an optimizer's quality from reward-model error."""
    import torch

    tokenizer = _tokenizer()
    prompts = tokenizer.batch_decode(prompt, skip_special_tokens=True)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    has_eos = (completion == tokenizer.eos_token_id).any(1).tolist()
    return torch.tensor([gold_reward(p, t, e) for p, t, e in zip(prompts, texts, has_eos)])


@functools.cache
def _tokenizer():
    return make_tokenizer()
