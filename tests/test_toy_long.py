"""The long toy tier (`--dataset toy-long`): deterministic data, the gold reward on hand values, the ideal summary at
the ceiling, what the references and preference pairs show, the tier's defaults, the reward model's two agreement
figures and what it learned of the mood, DR-PO's premise measured on a policy, and (slow) the learning check that SFT
rarely completes the whole title."""

from types import SimpleNamespace

import pytest
import torch

import common
import reward
import sft
import toy

NAMES = toy.NAME_WORDS[:12]
TITLE = [*NAMES[:4], "-", *NAMES[4:]]
POST = ["rain", "very", "cat", "rain", "proud", "bank", "cat", "so", "bank", "maybe", "TITLE:", *TITLE]
PROMPT = toy.prompt_text(POST)
QUOTE = "TITLE: " + " ".join(TITLE)
IDEAL = QUOTE + " rain cat bank proud"


def test_the_tier_is_deterministic_and_its_splits_disjoint():
    a, b = toy.sft_dataset("test", tier="toy-long"), toy.sft_dataset("test", tier="toy-long")
    assert a[:50] == b[:50]
    assert toy.preference_dataset("test", tier="toy-long")[:20] == toy.preference_dataset("test", tier="toy-long")[:20]
    assert toy.sft_dataset("test", seed=1, tier="toy-long")["prompt"][:5] != a["prompt"][:5]
    train = set(toy.sft_dataset("train", tier="toy-long")["prompt"])
    assert not train & set(a["prompt"])


def test_parts_and_ideal_summary():
    title, topics, mood = toy.long_parts(POST)
    assert (title, topics, mood) == (TITLE, ["rain", "cat", "bank"], "proud") and toy.main_title(title) == NAMES[:4]
    assert " ".join(toy.long_ideal_summary(POST)) == IDEAL
    assert 16 <= len(toy.long_ideal_summary(POST)) + 1 <= 32  # tokens, EOS included


@pytest.mark.parametrize(
    "summary, has_eos, expected",
    [
        (IDEAL, True, 1.0),
        (IDEAL, False, 0.5),  # no EOS: -0.5
        (IDEAL.replace(" proud", ""), True, 0.85),  # no mood: -0.15
        ("rain cat bank proud", True, 0.6),  # no title: -0.40
        ("TITLE: " + " ".join(NAMES[:4]) + " rain cat bank proud", True, 0.6),  # the main title only
        (IDEAL.replace(" - ", " "), True, 0.6),  # every name but not the "-"
        (IDEAL.replace(f" {NAMES[11]}", ""), True, 0.6),  # all but the last word
        (IDEAL.replace(NAMES[3], toy.NAME_WORDS[20]), True, 0.6),  # a wrong name: no title, and nothing more
        (IDEAL.replace(NAMES[3], NAMES[2]), True, 0.6),  # a name said twice: likewise
        (QUOTE + " rain cat bank dog proud", True, 0.8),  # a topic word not in the post: -0.2
        (IDEAL.replace(f"{NAMES[5]} {NAMES[6]}", f"{NAMES[6]} {NAMES[5]}"), True, 0.6),  # two names swapped
        (QUOTE + " rain cat bank very proud", True, 0.9),  # a filler: -0.1
        (QUOTE + " rain cat cat bank proud", True, 0.9),  # a repeat: -0.1
        (QUOTE + " cat rain bank proud", True, 0.955),  # topics out of order: 0.45 * 0.9
        (QUOTE + " rain cat proud", True, 0.865),  # 2 of 3 topics: 0.45 * (0.6 + 0.1) + 0.55
        ("rain cat bank proud " + QUOTE, True, 1.0),  # the parts in any order
    ],
)
def test_gold_reward_hand_values(summary, has_eos, expected):
    assert toy.gold_reward(PROMPT, summary, has_eos) == pytest.approx(expected)


def test_the_ideal_summary_scores_the_ceiling_and_beats_every_reference():
    test = toy.sft_dataset("test", tier="toy-long")
    ideal = [toy.gold_reward(p, " ".join(toy.long_ideal_summary(toy.post_words(p)))) for p in test["prompt"]]
    refs = [toy.gold_reward(p, c) for p, c in zip(test["prompt"], test["completion"])]
    assert min(ideal) == 1.0
    assert sum(1.0 if i > r else 0.5 if i == r else 0.0 for i, r in zip(ideal, refs)) / len(refs) >= 0.85


def test_what_the_references_and_the_preferences_show():
    """Every demonstration quotes the title, the whole title in few; then the topics in order, the last one left out
    in 70% (and nothing else); the chosen
    summaries (DR-PO's reset source on this tier) quote it whole in >= 30%; no demonstration and no candidate names
    the mood (only an online judge that knows its worth can pay for it)."""
    test = toy.sft_dataset("test", tier="toy-long")
    has = lambda p, c: toy.long_skills(toy.post_words(p), c)  # noqa: E731
    whole, short = 0, 0
    for p, c in zip(test["prompt"], test["completion"]):
        title, topics, mood = toy.long_parts(toy.post_words(p))
        words = c.split()
        n = sum(w in toy.NAME_WORDS or w == "-" for w in words)
        assert words[0] == "TITLE:" and words[1 : 1 + n] in (title, toy.main_title(title))  # exactly
        assert 3 <= len(toy.main_title(title)) <= 8 and words[1 + n :] in (topics, topics[:-1])  # no mood, no slip
        whole, short = whole + has(p, c)["title"], short + (words[1 + n :] == topics[:-1])
    assert 0.03 < whole / len(test) < 0.1 and 0.65 < short / len(test) < 0.75
    prefs = toy.preference_dataset("train", tier="toy-long").select(range(2000))
    chosen = [has(p, c) for p, c in zip(prefs["prompt"], prefs["chosen"])]
    assert sum(h["title"] for h in chosen) / 2000 >= 0.3
    assert not any(w in toy.MOOD_WORDS for c in list(prefs["chosen"]) + list(prefs["rejected"]) for w in c.split())


def test_the_candidates_carry_an_sft_policys_slips_and_the_labels_are_surer():
    """Preference candidates make the slips an SFT policy's samples make (a name not in the post, a topic word not
    in the post, a word said twice), and the labels are Bradley-Terry draws at the tier's temperature (0.1)."""
    import math

    prefs = toy.preference_dataset("train", tier="toy-long").select(range(4000))
    slips = {"name": 0, "topic": 0, "twice": 0}
    observed, expected = [], []
    for p, c, r in zip(prefs["prompt"], prefs["chosen"], prefs["rejected"]):
        post = toy.post_words(p)
        for words in (c.split(), r.split()):
            slips["name"] += any(w in toy.NAME_WORDS and w not in post for w in words)
            slips["topic"] += any(w in toy.TOPIC_WORDS and w not in post for w in words)
            slips["twice"] += any(a == b and a not in toy.NAME_WORDS for a, b in zip(words, words[1:]))
        gc, gr = toy.gold_reward(p, c), toy.gold_reward(p, r)
        observed.append(1.0 if gc > gr else 0.5 if gc == gr else 0.0)
        expected.append(1 / (1 + math.exp(-abs(gc - gr) / toy.LONG_BT_TEMPERATURE)))
    assert all(0.1 < n / 8000 < 0.6 for n in slips.values()), slips
    n = len(observed)
    stderr = math.sqrt(sum(q * (1 - q) for q in expected)) / n
    assert abs(sum(observed) / n - sum(expected) / n) < 4 * stderr
    assert len(toy.preference_dataset("train", tier="toy-long")) == toy.LONG_PREF_TRAIN == 12_000


def test_skill_pairs_differ_only_in_the_title():
    for pair in toy.skill_pairs().select(range(50)):
        title = toy.long_parts(toy.post_words(pair["prompt"]))[0]
        chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
        main = toy.main_title(title)
        assert chosen[:14] == ["TITLE:", *title] and rejected[: len(main) + 1] == ["TITLE:", *main]
        assert rejected[len(main) + 1 :] == chosen[14:]  # the same topics after the title
        assert toy.gold_reward(pair["prompt"], pair["chosen"]) > toy.gold_reward(pair["prompt"], pair["rejected"])


def test_the_tokenizer_covers_the_tier_within_its_lengths():
    tok = toy.make_tokenizer(tier="toy-long")
    test = toy.sft_dataset("test", tier="toy-long")
    unk = tok.unk_token_id
    for p in test["prompt"][:200]:
        ids = tok(p)["input_ids"]
        ideal = tok(" ".join(toy.long_ideal_summary(toy.post_words(p))), add_special_tokens=False)["input_ids"]
        assert unk not in ids + ideal and len(ids) <= 64 and len(ideal) + 1 <= toy.LONG_MAX_NEW_TOKENS
    assert tok.pad_token_id == len(toy.LONG_VOCAB) - 1 == toy.model_config(tier="toy-long").vocab_size


def long_args(module, **kwargs):
    """A script's arguments on the tier, as `--dataset toy-long` gives them: its preset, then `kwargs`."""
    return module.Args(**{**module.PRESETS["toy-long"], "dataset": "toy-long", **kwargs})


def test_long_skills_hand_values():
    skills = lambda summary: toy.long_skills(POST, summary)  # noqa: E731
    assert skills(IDEAL) == {"title": 1.0, "mood": 1.0}
    assert skills(IDEAL.replace(" proud", "")) == {"title": 1.0, "mood": 0.0}
    assert skills(IDEAL.replace(f" {NAMES[11]}", "")) == {"title": 0.0, "mood": 1.0}  # 11 of 12 names
    assert skills(" ".join(NAMES[::-1]) + " happy") == {"title": 0.0, "mood": 0.0}  # another post's mood


def test_evaluate_logs_the_skill_rates_greedy_and_at_temperature_one():
    """The rates that measure the tier's premise ("SFT rarely copies the title at temperature 1") come from the
    scripts' own evaluation: the greedy ones recomputed from its samples, the temperature-1 ones counts of 32."""
    torch.manual_seed(0)
    tok, test = toy.make_tokenizer(tier="toy-long"), toy.sft_dataset("test", tier="toy-long").select(range(32))
    args = SimpleNamespace(dataset="toy-long", max_prompt_length=64, max_new_tokens=48, no_eos_score=-1.0)
    metrics, samples = common.evaluate(common.load_model("toy-long"), tok, test, args, batch_size=16)
    for part in ("title", "mood"):
        greedy = [toy.long_skills(toy.post_words(s["prompt"]), s["completion"])[part] for s in samples]
        assert metrics[f"eval/{part}"] == pytest.approx(sum(greedy) / 32)
        assert 0.0 <= metrics[f"eval/{part}_t1"] <= 1.0 and (metrics[f"eval/{part}_t1"] * 32).is_integer()
    assert "eval/kl" not in metrics  # no reference policy given


def small_sft(tmp_path, steps: int) -> str:
    """A fresh toy-long model after `steps` SFT updates of 16 (a policy to measure, not a good one); its path."""
    sft.main(
        long_args(
            sft,
            output_dir=str(tmp_path),
            run_name="sft",
            max_steps=steps,
            batch_size=16,
            eval_prompts=8,
        )
    )
    return str(tmp_path / "sft")


def test_reward_model_on_the_tier_reports_both_gold_agreements(tmp_path):
    """`reward.py --dataset toy-long` measures the reward model where the tier needs it: on pairs of the SFT policy's
    samples and on pairs that differ only in the title."""
    import json

    small_sft(tmp_path, steps=2)
    reward.main(
        long_args(
            reward,
            model=str(tmp_path / "sft"),
            output_dir=str(tmp_path),
            run_name="rm",
            max_steps=2,
            batch_size=16,
            eval_pairs=16,
        )
    )
    final = json.loads((tmp_path / "rm" / "eval.json").read_text())
    for key in ("eval/gold_agreement_sft_samples", "eval/gold_agreement_skill_pairs"):
        assert 0.0 <= final[key] <= 1.0
    # toy.mood_scores: the model's own scores of the ideal summary with and without its mood word
    import data

    path = str(tmp_path / "rm")
    mood = toy.mood_scores(path, n=8)
    tokenizer = data.load_tokenizer(path)
    rm = common.load_model(path, "reward", tokenizer=tokenizer, frozen=True)
    prompts = toy.sft_dataset("test", tier="toy-long")["prompt"][:8]
    ideal = [toy.long_ideal_summary(toy.post_words(p)) for p in prompts]
    pad = tokenizer.pad_token_id
    prompt = data.pad(data.tokenize_prompts(tokenizer, prompts, 64), pad, "left")
    scores = []
    for words in (ideal, [[w for w in i if w not in toy.MOOD_WORDS] for i in ideal]):
        ids = [tokenizer(" ".join(w), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for w in words]
        with torch.no_grad():
            scores.append(common.reward_scores(rm, prompt, data.pad(ids, pad, "right"), pad))
    assert mood["with"] == pytest.approx(scores[0].mean().item(), abs=1e-5)
    assert mood["without"] == pytest.approx(scores[1].mean().item(), abs=1e-5)
    assert mood["prefers_mood"] == (scores[0] > scores[1]).float().mean().item()
    with pytest.raises(ValueError, match="not a long-tier model"):
        toy.mood_scores("toy-rm", n=1)
    with pytest.raises(ValueError, match="n must be"):
        toy.mood_scores(path, n=0)


def test_title_after_reset_matches_the_policys_own_log_probs(tmp_path):
    """toy.title_after_reset: `dash` is the mean of exp(log pi("-" | post, "TITLE:" + main title)) computed the way
    the trainers compute log-probs, `first` that of the subtitle's first word after the "-", `finish` a share of
    samples."""
    import data

    path = small_sft(tmp_path, steps=1)
    premise = toy.title_after_reset(path, n=16)
    tokenizer, policy = data.load_tokenizer(path), common.load_model(path, frozen=True)
    prompts = toy.sft_dataset("test", tier="toy-long")["prompt"][:16]
    quotes = [["TITLE:", *toy.main_title(toy.long_parts(toy.post_words(p))[0]), "-"] for p in prompts]
    prompt = data.pad(data.tokenize_prompts(tokenizer, prompts, 64), tokenizer.pad_token_id, "left")
    completion = data.pad(
        [tokenizer(" ".join(q), add_special_tokens=False)["input_ids"] for q in quotes], tokenizer.pad_token_id, "right"
    )
    with torch.no_grad():
        logps = common.completion_logprobs(policy, prompt, completion, tokenizer.pad_token_id)
    last = torch.tensor([len(q) - 1 for q in quotes])
    assert premise["dash"] == pytest.approx(logps[torch.arange(16), last].exp().mean().item(), abs=1e-5)
    firsts = [toy.long_parts(toy.post_words(p))[0][len(q) - 1] for p, q in zip(prompts, quotes)]  # after the "-"
    with_first = data.pad(
        [tokenizer(" ".join([*q, f]), add_special_tokens=False)["input_ids"] for q, f in zip(quotes, firsts)],
        tokenizer.pad_token_id,
        "right",
    )
    with torch.no_grad():
        logps = common.completion_logprobs(policy, prompt, with_first, tokenizer.pad_token_id)
    assert premise["first"] == pytest.approx(logps[torch.arange(16), last + 1].exp().mean().item(), abs=1e-5)
    assert premise["finish"] * 16 == round(premise["finish"] * 16) and 0 <= premise["finish"] <= 1
    with pytest.raises(ValueError, match="n must be"):
        toy.title_after_reset(path, n=0)


@pytest.mark.slow
def test_sft_learns_the_main_title_but_rarely_completes_the_whole_one(tmp_path):
    """The tier's premise, as a learning check with a fixed seed: `python sft.py --dataset toy-long` learns to copy
    the main title (greedy quotes are the post's main title, exactly) yet completes the whole title in under 10% of
    its samples at temperature 1 and never greedily, and leaves headroom (win rate at most 0.4); the step to the
    whole title is rare ("-" after the main title). Whether the rest then follows (`finish`) depends on the build:
    which copy forms depends on the seed and on the machine (README). About 5 minutes on one core."""
    import json

    sft.main(long_args(sft, output_dir=str(tmp_path), run_name="sft", eval_prompts=200, eval_every=10**9))
    final = json.loads((tmp_path / "sft" / "eval.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "sft" / "samples.jsonl").read_text().splitlines()]
    copied = 0
    for s in samples:
        main = ["TITLE:", *toy.main_title(toy.long_parts(toy.post_words(s["prompt"]))[0])]
        copied += s["completion"].split()[: len(main)] == main
    assert copied / len(samples) > 0.9  # the copy has formed
    assert 0.2 < final["eval/win_rate"] <= 0.4
    assert final["eval/title"] < 0.05 and final["eval/title_t1"] < 0.1
    premise = toy.title_after_reset(str(tmp_path / "sft"), n=200)
    assert premise["dash"] < 0.15


def test_gold_and_skill_rates_hand_values():
    """Each completion's gold (its EOS flag counted) and, of the greedy and the temperature-1 completions, the
    skill rates."""
    samples = [{"prompt": PROMPT, "completion": IDEAL}, {"prompt": PROMPT, "completion": "rain cat bank proud"}]
    golds = toy.gold([PROMPT] * 2, [s["completion"] for s in samples], has_eos=[True, False])
    assert golds == pytest.approx([1.0, 0.1])  # the second: no title, no EOS
    metrics = toy.skill_rates(samples, sampled=[QUOTE, "cat"])
    assert metrics == pytest.approx({"eval/title": 0.5, "eval/mood": 1.0, "eval/title_t1": 0.5, "eval/mood_t1": 0.0})
