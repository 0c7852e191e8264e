"""Datasets -> token ids: loading (toy, files, save_to_disk, the Hub), the known layouts turned into TRL's
columns (prompt; prompt/completion; prompt/chosen/rejected; text or lists of messages), the held-out split,
chat templates and tokenization of prompts, completions and preference pairs."""

from __future__ import annotations

import copy
import os

import datasets
import torch
from transformers import AutoTokenizer

import toy
import training
from training import UserError

HH_ASSISTANT = "\n\nAssistant:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
PAD_TOKEN = "<|pad|>"  # the pad load_tokenizer adds, and the toy tokenizer's: the same id at every stage


def load_tokenizer(name: str):
    """The tokenizer with a pad token of its own (never EOS: a model must see EOS in its loss to learn to stop),
    padding on the left. The pad may lie outside the embedding: forward() never embeds it. The tokenizer as it
    came (EOS as pad) is kept as `.without_added_pad`, for `save_model`."""
    if name in ("toy", "toy-tiny", "toy-long"):
        tier = "toy-long" if name == "toy-long" else "toy"
        tokenizer = toy.make_tokenizer(tier=tier)
        tokenizer.without_added_pad = toy.make_tokenizer(pad=False, tier=tier)
        return tokenizer
    path = toy.resolve_model(name)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(
            f"{name} has a model but no tokenizer: save the tokenizer it was trained with into it "
            f"(AutoTokenizer.from_pretrained(BASE).save_pretrained({path!r}))"
        )
    tokenizer = from_pretrained(AutoTokenizer, path)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {name!r} has no EOS token; set one (tokenizer.eos_token) before training")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        original = copy.deepcopy(tokenizer)
        original.pad_token = original.eos_token
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.without_added_pad = original
    return tokenizer


def from_pretrained(cls, name, **kwargs):
    try:
        return cls.from_pretrained(name, trust_remote_code=training.TRUST_REMOTE_CODE, **kwargs)
    except OSError as e:
        offline = " (offline: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        detail = str(e).splitlines()[0]
        raise UserError(f"cannot load {name!r}{offline}: not a local directory nor on the Hub ({detail})") from None


def load_data(name: str, split: str, columns: tuple[str, ...]) -> datasets.Dataset:
    """`toy`, a `save_to_disk` directory, a .json/.jsonl/.parquet/.csv file or a Hub id, with `columns` (the
    known layouts are converted by `standardize`); the split must not be empty."""
    if name in toy.TIERS:
        data = (toy.preference_dataset if "chosen" in columns else toy.sft_dataset)(split, tier=name)
    elif os.path.isdir(name):
        data = _read(name, datasets.load_from_disk, name)
        if isinstance(data, datasets.Dataset):  # a saved Dataset is a train split without a test split
            data = datasets.DatasetDict({"train": data})
        data = _pick_split(data, split, name, columns)
    elif os.path.isfile(name):
        ext = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(name.rsplit(".", 1)[-1])
        if ext is None:
            raise UserError(f"cannot read {name!r}: use .json, .jsonl, .parquet, .csv or a save_to_disk directory")
        data = _pick_split(_read(name, datasets.load_dataset, ext, data_files=name), split, name, columns)
    elif name.endswith((".json", ".jsonl", ".parquet", ".csv")) or name.startswith((".", "/")):
        raise UserError(f"dataset file {name!r} does not exist")
    else:
        try:
            data = datasets.load_dataset(name)
        except Exception as e:  # offline, unknown id, no access: the library's messages vary by version
            offline = " (offline: HF_DATASETS_OFFLINE=1)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
            raise UserError(f"cannot load dataset {name!r} from the Hub{offline}: {str(e).splitlines()[0]}") from None
        data = _pick_split(data, split, name, columns)
    if len(data) == 0:
        raise UserError(f"dataset {name!r} ({split}) is empty")
    data = standardize(data, columns, f"{name!r} ({split})")
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise UserError(f"dataset {name!r} ({split}) lacks column(s) {missing}; it has {data.column_names}")
    return data


def _read(name, load, *args, **kwargs):
    try:  # an empty or malformed file fails deep inside `datasets`, with errors that vary: one line instead
        return load(*args, **kwargs)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read dataset {name!r}: empty or malformed ({detail})") from None


def _pick_split(data: datasets.DatasetDict, split: str, name: str, columns: tuple[str, ...] = ()) -> datasets.Dataset:
    """`split`, else its other names on the Hub: `validation` for `test`, `<split>_prefs|_sft|_gen` by the data
    asked for (ultrafeedback_binarized). Without a test split, the last 10% of the train split (1 to 500 rows)
    are held out as the test split and training gets the rows before them: evaluation never sees a training row."""
    kinds = ["prefs"] if "chosen" in columns else ["sft"] if "completion" in columns else ["gen", "prefs", "sft"]
    names = lambda s: [s] + (["validation"] if s == "test" else []) + [f"{s}_{k}" for k in kinds]  # noqa: E731
    found = {s: next((n for n in names(s) if n in data), None) for s in ("train", "test")}
    if split in found and found["test"] is None and found["train"] is not None:
        return _held_out(data[found["train"]], split, name)
    for s in names(split):
        if s in data:
            if s != split:
                print(f"[data] {name!r}: split {s!r} as the {split} split")
            return data[s]
    raise UserError(f"dataset {name!r} has no split {split!r} (nor {names(split)[1:]}); it has {list(data)}")


_HELD_OUT_SHOWN = set()  # (name, rows) of the splits already printed: scripts load train and test separately


def _held_out(data: datasets.Dataset, split: str, name: str) -> datasets.Dataset:
    n = len(data)
    if n == 0:
        return data  # load_data says it is empty
    if n == 1:
        raise UserError(f"dataset {name!r} has 1 row and no test split: it needs 2 or more (1 held out for evaluation)")
    n_test = min(500, max(1, n // 10))
    if (name, n) not in _HELD_OUT_SHOWN:
        _HELD_OUT_SHOWN.add((name, n))
        print(f"[data] {name!r} has no test split: {n - n_test} rows for training, {n_test} held out for evaluation")
    return data.select(range(n - n_test) if split == "train" else range(n - n_test, n))


def standardize(data: datasets.Dataset, columns: tuple[str, ...], name: str = "dataset") -> datasets.Dataset:
    """TRL's standard columns from the known layouts that lack them; standard rows pass through unchanged.
    - `messages` (ultrafeedback_binarized train_sft, UltraChat), when a completion is asked for or there is no
      `chosen`: the last assistant turn is the completion, the turns before it the prompt;
    - no prompt, `chosen`/`rejected` as whole dialogues (Anthropic/hh-rlhf, ultrafeedback's message lists
      beside a plain `prompt` string): split by `split_dialogues`;
    - `completion` asked of preference data: the chosen responses (SFT on the preferred answers, as DPO's HH)."""
    cols, first = set(data.column_names), data[0]
    use_messages = "messages" in cols and is_conversation(first["messages"]) and "completion" not in cols
    if use_messages and ("completion" in columns or "chosen" not in cols):
        messages = list(data["messages"])
        ends = [bool(m) and m[-1]["role"] == "assistant" for m in messages]
        if "completion" in columns and not all(ends):
            raise UserError(f"{name}: row {ends.index(False)}'s `messages` does not end with an assistant turn")
        prompts, completions = (
            [m[:-1] if e else m for m, e in zip(messages, ends)],
            [m[-1:] if e else [] for m, e in zip(messages, ends)],
        )
        return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})
    if {"chosen", "rejected"} <= cols and (
        "prompt" not in cols or (is_conversation(first["chosen"]) and not is_conversation(first["prompt"]))
    ):
        pairs = zip(data["chosen"], data["rejected"])
        rows = [split_dialogues(c, r, f"{name} row {i}") for i, (c, r) in enumerate(pairs)]
        data = datasets.Dataset.from_dict(dict(zip(("prompt", "chosen", "rejected"), map(list, zip(*rows)))))
    if "completion" in columns and "completion" not in data.column_names and "chosen" in data.column_names:
        print(f"[data] {name} has no `completion` column: the `chosen` responses are the completions")
        data = data.rename_column("chosen", "completion")
    return data


def is_conversation(x) -> bool:
    """A list of {"role", "content"} messages (TRL's conversational format), rather than plain text."""
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def split_dialogues(chosen, rejected, where: str = "row") -> tuple:
    """Two whole dialogues that share a prompt -> (prompt, chosen continuation, rejected continuation). Message
    lists: the prompt is the messages they share (the last one is never shared). Anthropic HH transcripts: the
    prompt is their common prefix cut after its last `\\n\\nAssistant:` (multi-turn included); continuations keep
    the space after it, as TL;DR's " " + summary (a byte-level BPE reads " word" as one token)."""
    if is_conversation(chosen) and is_conversation(rejected):
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise UserError(f"{where}: `chosen` and `rejected` must both be strings or both lists of messages")
    end = chosen.rfind(HH_ASSISTANT)  # the last marker inside their common prefix (string compares: HH is 160k rows)
    while end >= 0 and not rejected.startswith(chosen[: end + len(HH_ASSISTANT)]):
        end = chosen.rfind(HH_ASSISTANT, 0, end)
    if end < 0:
        raise UserError(f"{where}: no prompt column, and `chosen`/`rejected` share no '\\n\\nAssistant:' turn")
    end += len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def chat_text(tokenizer, prompt, completion=None) -> tuple[str, str | None]:
    """Messages -> text with the tokenizer's chat template: the prompt with the assistant's generation prompt,
    the completion as the template writes the reply, cut after its first EOS (the end of turn is the EOS the
    policy learns to stop at). Text passes through."""
    if not is_conversation(prompt):
        return prompt, completion
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "conversational data (lists of messages) needs a tokenizer with a chat template; this one has none"
        )
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if completion is None or isinstance(completion, str):  # a plain-text reply continues the rendered prompt
        return text, completion
    full = tokenizer.apply_chat_template(prompt + list(completion), tokenize=False)
    # a template that renders a finished reply unlike its generation prompt: the reply's text alone
    reply = full[len(text) :] if full.startswith(text) else "".join(m["content"] for m in completion)
    eos = tokenizer.eos_token
    return text, reply[: reply.index(eos) + len(eos)] if eos in reply else reply


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text; a text that starts with BOS (chat templates write it) gets no second one."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    if not any(has_bos):
        return tokenizer(texts)["input_ids"]
    return [tokenizer(t, add_special_tokens=not b)["input_ids"] for t, b in zip(texts, has_bos)]


def truncate_prompt(ids: list, max_len: int, bos_id: int | None) -> list:
    """The last `max_len` tokens, BOS first if there was one: the end of a long post (TL;DR:) or of a
    conversation (the last turns, the assistant header) is what the completion continues."""
    if len(ids) <= max_len:
        return ids
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - (max_len - len(head)) :]


def tokenize_prompts(tokenizer, prompts: list, max_prompt: int) -> list[list[int]]:
    """Token ids of prompts (text or messages), truncated by `truncate_prompt`."""
    texts = [chat_text(tokenizer, p)[0] for p in prompts]
    return [truncate_prompt(ids, max_prompt, tokenizer.bos_token_id) for ids in encode(tokenizer, texts)]


def tokenize_pair(tokenizer, prompt, completion, max_prompt: int, max_completion: int) -> tuple[list, list]:
    """Token ids of (prompt, completion + EOS), text or messages. prompt and prompt + completion are tokenized and
    split at their common prefix, so a merge across the boundary, BOS and chat templates count once. Long prompts
    keep their end; long completions are cut to `max_completion` (the EOS may be lost)."""
    prompt, completion = chat_text(tokenizer, prompt, completion)
    p_ids, full = encode(tokenizer, [prompt, prompt + completion])
    k = 0
    while k < min(len(p_ids), len(full)) and p_ids[k] == full[k]:
        k += 1
    prompt_ids, completion_ids = full[:k], full[k:]
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return truncate_prompt(prompt_ids, max_prompt, tokenizer.bos_token_id), completion_ids[:max_completion]


def tokenize_pairs(tokenizer, data, max_prompt: int, max_completion: int) -> list[dict]:
    """{"prompt", "chosen", "rejected"} token ids of each row of preference data, one prompt for both completions."""
    rows = []
    for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"]):
        prompt, chosen = tokenize_pair(tokenizer, p, c, max_prompt, max_completion)
        prompt_r, rejected = tokenize_pair(tokenizer, p, r, max_prompt, max_completion)
        if prompt_r != prompt:  # a completion merged with the prompt's last token: keep the shorter prompt
            k = min(len(prompt), len(prompt_r))
            prompt, chosen, rejected = prompt[:k], prompt[k:] + chosen, prompt_r[k:] + rejected
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def pad(seqs: list[list[int]], pad_id: int, side: str) -> torch.Tensor:
    """Lists of ids -> a [B, longest] tensor, padded on the left or the right."""
    width = max(len(s) for s in seqs)
    rows = [([pad_id] * (width - len(s)) + s) if side == "left" else (s + [pad_id] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def retokenize(prompt, completion, tokenizer, rm_tokenizer):
    """Policy ids -> the reward model's: prompt + completion decoded as one text (without pad, leading BOS and EOS,
    so word boundaries survive), encoded by the RM's tokenizer, its EOS appended where there was one. Returns (an
    empty [B, 0] prompt, [B, L] right-padded, the RM's pad id): the score is read at the last token."""
    pad_id, bos_id, eos_id = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    texts, ended = [], []
    for p, c in zip(prompt.tolist(), completion.tolist()):
        p, c = [t for t in p if t != pad_id], [t for t in c if t != pad_id]
        p = p[1:] if p and p[0] == bos_id else p
        ended.append(eos_id in c)
        texts.append(tokenizer.decode(p + (c[: c.index(eos_id)] if eos_id in c else c)))
    ids = [i + [rm_tokenizer.eos_token_id] * e for i, e in zip(encode(rm_tokenizer, texts), ended)]
    full = pad(ids, rm_tokenizer.pad_token_id, "right").to(completion.device)
    return full[:, :0], full, rm_tokenizer.pad_token_id


def epochs(loader, generator: torch.Generator, position=None):
    """The batches of a shuffling DataLoader, epoch after epoch, each with its position (the state of `generator`,
    its sampler's, at the start of the epoch; the batch's index in it). From a saved position: the batches the
    uninterrupted run would have seen next."""
    skip = 0
    if position is not None:
        generator.set_state(position[0])
        skip = position[1] + 1
    while True:
        epoch_start = generator.get_state()
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch, (epoch_start, i)
        skip = 0
