"""A small batch of the toy task's test split, tokenized and padded as the scripts do it."""

import data
import toy


def toy_batch(tokenizer, n: int = 6):
    """(prompt [n, P] left-padded, completion [n, C] right-padded, EOS included) of the first n test rows."""
    rows = toy.sft_dataset("test").select(range(n))
    pairs = [data.tokenize_pair(tokenizer, p, c, 32, 16) for p, c in zip(rows["prompt"], rows["completion"])]
    prompt = data.pad([p for p, _ in pairs], tokenizer.pad_token_id, "left")
    completion = data.pad([c for _, c in pairs], tokenizer.pad_token_id, "right")
    return prompt, completion
