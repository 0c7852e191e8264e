"""Tiny randomly initialised models of real architectures, saved like Hub checkpoints, for tests.

Each architecture comes with a byte-level BPE tokenizer trained here (vocabulary ~400) and the special
tokens its family ships with, so the pad-token cases of real checkpoints are all covered:

| arch       | like                 | BOS added | EOS           | pad                   | chat template      |
| ---------- | -------------------- | --------- | ------------- | --------------------- | ------------------ |
| `gpt2`     | GPT-2                | no        | <|endoftext|> | none                  | none               |
| `gpt_neox` | Pythia (pad := EOS)  | no        | <|endoftext|> | = EOS                 | none               |

(GPT-NeoX's embedding, like Pythia's, has spare rows past the tokenizer's last id.)
| `llama`    | Llama 3 Instruct     | yes       | <|eot_id|>    | none                  | writes BOS itself  |
| `qwen2`    | Qwen2 Instruct       | no        | <|im_end|>    | <|endoftext|> (real)  | ChatML             |

`save_tiny(root, arch)` writes `root/<arch>` (a causal LM) and `root/<arch>-rm` (a 1-label sequence
classifier on the same backbone, random head), each with its tokenizer, and returns both paths. Hidden 32,
1 layer: a model loads and runs a step in milliseconds.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHS = ["gpt2", "gpt_neox", "llama", "qwen2"]
WORDS = (
    "the a my our i you he she we they it is was are be have had do did not no yes and but or so if when then "
    "what why how can could would should will just really very much more some all one two three time day week "
    "year work job boss friend family mom dad girlfriend boyfriend roommate house apartment rent money car dog "
    "cat school class exam party phone game help advice think feel know want need told said asked went got "
    "make made good bad new old long last first never always still again after before about with without from "
    "summary post title question answer thanks please sorry hello"
).split()
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sentence(rng: random.Random, n_min: int = 4, n_max: int = 14) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max))]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])


def corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Text in the shapes the tests use: TL;DR posts, HH transcripts, plain sentences."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(
            f"SUBREDDIT: r/{rng.choice(WORDS)}\n\nTITLE: {sentence(rng)}\n\n"
            f"POST: {sentence(rng)} {sentence(rng)}\n\nTL;DR: {sentence(rng)}"
        )
        lines.append(f"\n\nHuman: {sentence(rng)}\n\nAssistant: {sentence(rng)}")
    return lines


def train_bpe(special: list[str], vocab_size: int = 400, seed: int = 0, add_bos: str | None = None) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: lossless decode) trained on `corpus(seed)`; `add_bos` prepends that token
    to every encoding, as Llama tokenizers do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{add_bos} $A", pair=f"{add_bos} $A $B", special_tokens=[(add_bos, tok.token_to_id(add_bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def make_tokenizer(arch: str, vocab_size: int = 400, seed: int = 0) -> PreTrainedTokenizerFast:
    """The tokenizer of `arch` as in the table above (before data.load_tokenizer adds any pad)."""
    if arch in ("gpt2", "gpt_neox"):
        backend = train_bpe(["<|endoftext|>"], vocab_size, seed)
        special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        if arch == "gpt_neox":
            special["pad_token"] = "<|endoftext|>"  # the usual `tokenizer.pad_token = tokenizer.eos_token`
        return PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    if arch == "llama":
        specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
        backend = train_bpe(specials, vocab_size, seed, add_bos="<|begin_of_text|>")
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            additional_special_tokens=specials[2:],
            chat_template=LLAMA_TEMPLATE,
        )
    if arch == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        backend = train_bpe(specials, vocab_size, seed)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=specials[1:],
            chat_template=CHATML_TEMPLATE,
        )
    raise ValueError(arch)


def make_config(arch: str, tokenizer, num_labels: int | None = None):
    """Hidden 32, 1 layer, 4 heads (Llama/Qwen2: 2 KV heads), dropout 0, the tokenizer's special ids."""
    # Pythia's embedding has spare rows (50304 for 50277 tokens), so the pad load_tokenizer adds lies inside it
    vocab_size = -(-len(tokenizer) // 64) * 64 if arch == "gpt_neox" else len(tokenizer)
    ids = dict(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if num_labels:
        ids["num_labels"] = num_labels
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=1, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            **ids,
        )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        **ids,
    )


def save_tiny(root: Path, arch: str, seed: int = 0) -> tuple[str, str]:
    """root/<arch> (causal LM) and root/<arch>-rm (reward model), each with its tokenizer. Returns the paths."""
    tokenizer = make_tokenizer(arch)
    paths = []
    for suffix, cls, labels in (("", AutoModelForCausalLM, None), ("-rm", AutoModelForSequenceClassification, 1)):
        torch.manual_seed(seed)
        model = cls.from_config(make_config(arch, tokenizer, labels))
        if labels:
            torch.nn.init.normal_(model.score.weight, std=1.0)  # scores of order 1
        path = Path(root) / f"{arch}{suffix}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]
