"""Shared plumbing for the algorithm scripts: setup, tokenization, generation, log-probs, reward scoring,
masked statistics, data loading, logging and evaluation. No algorithm logic lives here.

Tensor layout used everywhere: a batch is `prompt` [B, P] left-padded and `completion` [B, C]
right-padded, both with the tokenizer's dedicated pad id; the model sees `cat([prompt, completion])`
with `attention_mask = ids != pad` and `position_ids = cumsum(mask) - 1`, so left padding never
changes a logit. A completion is its tokens up to and including the first EOS, then padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

import toy

transformers.logging.set_verbosity_error()  # keep stderr for our own one-line errors
transformers.logging.disable_progress_bar()

HERE = Path(__file__).resolve().parent


def toy_cache() -> Path:
    """Where the toy SFT and reward models are built on first use: $RLHF_TOY_CACHE or ./toy_cache."""
    return Path(os.environ.get("RLHF_TOY_CACHE", HERE / "toy_cache"))


class UserError(Exception):
    """A mistake in the input (arguments, data, paths): reported as one line, exit code 2."""


def run_cli(args_cls, main):
    """`main(tyro.cli(Args))`, turning input mistakes into a one-line error and a non-zero exit."""
    import tyro

    try:
        main(tyro.cli(args_cls))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Setup: accelerator, seed, precision
# ---------------------------------------------------------------------------------------------


def setup(seed: int) -> Accelerator:
    """One process on CPU or one GPU by default; `accelerate launch` / `torchrun` for more. bf16 autocast
    on CUDA (weights stay fp32 for the optimizer), fp32 on CPU. Each rank gets its own seed."""
    # cpu=True on a CPU machine: without it accelerate ignores torchrun's ranks (every rank runs alone)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if torch.cuda.is_available() else "no")
    set_seed(seed + 100003 * accelerator.process_index)
    return accelerator


def frozen_dtype() -> torch.dtype:
    """Precision for models that are never trained (reference, reward model)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


# ---------------------------------------------------------------------------------------------
# Models and tokenizers ("toy" names resolve to the built-in task)
# ---------------------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """`toy-sft` / `toy-rm` -> the cached toy models (built on first use); anything else is passed on."""
    if name not in ("toy-sft", "toy-rm"):
        return name
    cache = toy_cache()
    path = cache / name
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


def load_tokenizer(name: str):
    """Tokenizer with a dedicated pad token (never EOS: a model must see EOS in its loss to learn to
    stop) and left padding. A new pad id may lie outside the embedding; forward() never embeds it."""
    if name in ("toy", "toy-tiny"):
        return toy.make_tokenizer()
    tokenizer = _from_pretrained(AutoTokenizer, resolve_model(name))
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {name!r} has no EOS token; set one (tokenizer.eos_token) before training")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str, kind: str = "causal", dtype: torch.dtype = torch.float32):
    """AutoModelForCausalLM (kind="causal") or a 1-label AutoModelForSequenceClassification ("reward"),
    dropout off. `toy` / `toy-tiny` build a fresh ~1M / ~0.1M-parameter model for the toy task. A new
    scalar head gets std 1/sqrt(H+1) (N+)."""
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1}
    if name == "toy-gold" and kind == "reward":  # the gold oracle: toy-rm's network (a PPO critic may start from
        model = load_model("toy-rm", kind, dtype)  # it), whose scores reward_scores() replaces by the gold reward
        model.config.toy_gold = True
        return model
    if name in ("toy", "toy-tiny"):
        config = toy.model_config({"toy": "small", "toy-tiny": "tiny"}[name])
        model, missing = cls.from_config(config.__class__(**{**config.to_dict(), **extra})), ["score.weight"]
    else:
        model, info = _from_pretrained(cls, resolve_model(name), dtype=dtype, output_loading_info=True, **extra)
        missing = info["missing_keys"]
    if kind == "reward" and any(k.startswith("score.") for k in missing):  # fresh head: N+ init
        torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    disable_dropout(model)
    return model


def _from_pretrained(cls, name, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as e:
        offline = " (offline: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"cannot load {name!r}{offline}: not a local directory and not loadable from the Hub ({str(e).splitlines()[0]})") from None  # fmt: skip


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------
# Data: loading, validation, tokenization, padding
# ---------------------------------------------------------------------------------------------


def load_data(name: str, split: str, columns: tuple[str, ...]) -> datasets.Dataset:
    """`toy` (prompt/completion or prompt/chosen/rejected, chosen by `columns`), a `save_to_disk` directory,
    a .json/.jsonl/.parquet/.csv file, or a Hub id. Checks the columns and that the split is not empty."""
    if name == "toy":
        data = (toy.preference_dataset if "chosen" in columns else toy.sft_dataset)(split)
    elif os.path.isdir(name):
        data = _read(name, datasets.load_from_disk, name)
        if isinstance(data, datasets.DatasetDict):
            data = _pick_split(data, split, name)
    elif os.path.isfile(name):
        ext = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(name.rsplit(".", 1)[-1])
        if ext is None:
            raise UserError(f"cannot read {name!r}: use .json, .jsonl, .parquet, .csv or a save_to_disk directory")
        data = _pick_split(_read(name, datasets.load_dataset, ext, data_files=name), split, name)
    elif name.endswith((".json", ".jsonl", ".parquet", ".csv")) or name.startswith((".", "/")):
        raise UserError(f"dataset file {name!r} does not exist")
    else:
        try:
            data = _pick_split(datasets.load_dataset(name), split, name)
        except Exception as e:  # offline, unknown id, no access: the library's messages vary by version
            offline = " (offline: HF_DATASETS_OFFLINE=1)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
            raise UserError(f"cannot load dataset {name!r} from the Hub{offline}: {str(e).splitlines()[0]}") from None
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise UserError(f"dataset {name!r} ({split}) lacks column(s) {missing}; it has {data.column_names}")
    if len(data) == 0:
        raise UserError(f"dataset {name!r} ({split}) is empty")
    return data


def _read(name, load, *args, **kwargs):
    """An empty or malformed file fails inside `datasets` (StopIteration, ValueError "corresponds to no data",
    IndexError for an empty save_to_disk...): one line instead."""
    try:
        return load(*args, **kwargs)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read dataset {name!r}: empty or malformed ({detail})") from None


def _pick_split(data: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    """A file or saved dataset with only a train split: the test split is its last 10% (at most 500 rows)."""
    if split in data:
        return data[split]
    if split == "test" and list(data) == ["train"] and len(data["train"]) >= 2:
        n_test = min(500, max(1, len(data["train"]) // 10))
        print(f"[data] {name!r} has no test split: evaluating on its last {n_test} rows")
        return data["train"].select(range(len(data["train"]) - n_test, len(data["train"])))
    if split == "train" and list(data) == ["train"]:
        return data["train"]
    raise UserError(f"dataset {name!r} has no split {split!r}; it has {list(data)}")


def tokenize_pair(tokenizer, prompt: str, completion: str, max_prompt: int, max_completion: int) -> tuple[list, list]:
    """Token ids of (prompt, completion + EOS). Tokenizes prompt and prompt+completion and splits at
    their common prefix, so merges across the boundary and BOS/chat templates are counted once. Long
    prompts keep their *end* (BOS kept); long completions are cut to `max_completion` (EOS may be lost)."""
    p_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    k = 0
    while k < min(len(p_ids), len(full)) and p_ids[k] == full[k]:
        k += 1
    prompt_ids, completion_ids = full[:k], full[k:]
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return truncate_prompt(prompt_ids, max_prompt, tokenizer.bos_token_id), completion_ids[:max_completion]


def truncate_prompt(ids: list, max_len: int, bos_id: int | None) -> list:
    if len(ids) <= max_len:
        return ids
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - (max_len - len(head)) :]


def pad(seqs: list[list[int]], pad_id: int, side: str) -> torch.Tensor:
    """List of id lists -> [B, max_len] tensor, padded on the left or the right."""
    width = max(len(s) for s in seqs)
    rows = [([pad_id] * (width - len(s)) + s) if side == "left" else (s + [pad_id] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt: int) -> list[list[int]]:
    return [truncate_prompt(ids, max_prompt, tokenizer.bos_token_id) for ids in tokenizer(prompts)["input_ids"]]


# ---------------------------------------------------------------------------------------------
# Forward passes: generation, log-probs, reward scores
# ---------------------------------------------------------------------------------------------


def forward(model, ids: torch.Tensor, pad_id: int, **kwargs):
    """Forward with the attention mask and position ids derived from `ids != pad_id`; pad ids are never
    embedded (a pad token added to the tokenizer may have no embedding row)."""
    mask = ids != pad_id
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(), position_ids=position_ids, **kwargs)


def truncate_after_eos(completion: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything after the first EOS becomes padding. Returns (completion, has_eos)."""
    is_eos = completion == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return completion.masked_fill(after_eos, pad_id), is_eos.any(1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, tokenizer, max_new_tokens: int, temperature: float, top_p: float = 1.0, logits_processor=None):  # fmt: skip
    """Sample completions for left-padded prompts ([B, P] -> [B, C]) at `temperature` (0 = greedy), then
    pad everything after the first EOS. Returns (completion, has_eos)."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    mask = prompt != pad_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
        eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=tokenizer.bos_token_id,
        suppress_tokens=[pad_id] if pad_id < model.config.vocab_size else None,  # a sampled pad would read as padding
    )  # fmt: skip
    # transformers fills unset fields from the checkpoint's generation_config.json (repetition_penalty,
    # min_p...): sample from softmax(logits / T) only, which is what completion_logprobs scores
    default, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(
            input_ids=prompt.masked_fill(~mask, 0), attention_mask=mask.long(), generation_config=config,
            logits_processor=logits_processor,
        )  # fmt: skip
    finally:
        model.generation_config = default
    return truncate_after_eos(out[:, prompt.shape[1] :], eos_id, pad_id)


def completion_logprobs(model, prompt, completion, pad_id, temperature=1.0, chunk_rows=16, with_entropy=False):
    """Per-token log pi(y_t | x, y_<t) of the completion tokens, [B, C], 0 on padding. Logits come only
    for completion positions (`logits_to_keep`), are divided by the sampling temperature, and go
    through an fp32 log-softmax a few rows at a time (never a full fp32 batch x length x vocab tensor)."""
    C = completion.shape[1]
    logits = forward(model, torch.cat([prompt, completion], 1), pad_id, logits_to_keep=C + 1).logits[:, :-1]
    targets = completion.masked_fill(completion == pad_id, 0)
    logps, entropies = [], []
    for i in range(0, logits.shape[0], chunk_rows):
        scaled = logits[i : i + chunk_rows].float() / temperature
        if pad_id < scaled.shape[-1]:  # generate() never samples an in-vocabulary pad: score that same distribution
            scaled[..., pad_id] = torch.finfo(scaled.dtype).min
        logp = F.log_softmax(scaled, dim=-1)
        logps.append(logp.gather(-1, targets[i : i + chunk_rows, :, None]).squeeze(-1))
        if with_entropy:
            entropies.append(-(logp.exp() * logp).sum(-1))
    valid = completion != pad_id
    logps = torch.cat(logps).masked_fill(~valid, 0.0)
    return (logps, torch.cat(entropies).masked_fill(~valid, 0.0)) if with_entropy else logps


def last_token_index(prompt: torch.Tensor, completion: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index (in cat([prompt, completion])) of the last real completion token: the EOS, or the final
    token when there is no EOS."""
    return prompt.shape[1] + (completion != pad_id).sum(1) - 1


def reward_scores(reward_model, prompt, completion, pad_id, has_eos=None, no_eos_score: float | None = None):
    """Reward-model score read at the EOS token (the last real token), minus the stored normalization
    bias. Completions without EOS get `no_eos_score` instead (N+ replaces the score by -1).
    `--reward-model toy-gold` scores with the toy task's gold reward of the decoded text instead."""
    if getattr(reward_model.config, "toy_gold", False):
        scores = toy_gold_scores(prompt, completion, pad_id)
    else:
        scores = _model_scores(reward_model, prompt, completion, pad_id)
    if has_eos is not None and no_eos_score is not None:
        scores = torch.where(has_eos, scores, torch.full_like(scores, no_eos_score))
    return scores


def _model_scores(reward_model, prompt, completion, pad_id):
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = forward(backbone, torch.cat([prompt, completion], 1), pad_id).last_hidden_state
    idx = last_token_index(prompt, completion, pad_id)
    scores = reward_model.score(hidden[torch.arange(len(idx), device=idx.device), idx]).squeeze(-1).float()
    return scores - getattr(reward_model.config, "reward_bias", 0.0)


def toy_gold_scores(prompt, completion, pad_id):
    """toy.gold_reward of each (prompt, completion) decoded with the toy tokenizer: the oracle that separates
    an optimizer's quality from reward-model error. A fixed function: it cannot be trained."""
    if torch.is_grad_enabled():
        raise UserError("--reward-model toy-gold is a fixed oracle (the toy gold reward): it cannot be trained")
    tokenizer = _toy_tokenizer()
    prompts = tokenizer.batch_decode(prompt, skip_special_tokens=True)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    has_eos = (completion == tokenizer.eos_token_id).any(1).tolist()
    scores = [toy.gold_reward(p, t, e) for p, t, e in zip(prompts, texts, has_eos)]
    return torch.tensor(scores, dtype=torch.float32, device=completion.device)


@functools.cache
def _toy_tokenizer():
    return toy.make_tokenizer()


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over mask; a row with no valid entry gives 0, not NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------------------------------------
# Runs: directory, TensorBoard, metrics.jsonl, wandb, progress bar, samples
# ---------------------------------------------------------------------------------------------


class Run:
    """runs/<run_name>/ with args.json, TensorBoard events, metrics.jsonl and samples.jsonl. Only the
    main process writes; metrics are averaged across processes before logging."""

    def __init__(self, args, accelerator: Accelerator, total: int):
        self.accelerator = accelerator
        name = args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"
        self.dir = Path(args.output_dir) / name
        self.main = accelerator.is_main_process
        self.writer = self.bar = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str))
            self.writer = SummaryWriter(str(self.dir))
            self.bar = tqdm(total=total, desc=args.exp_name, dynamic_ncols=True, file=sys.stdout, mininterval=1 if sys.stdout.isatty() else 10)
            if args.track:
                import wandb

                wandb.init(project=args.wandb_project, name=name, config=dataclasses.asdict(args), sync_tensorboard=True)

    def log(self, metrics: dict, step: int, show: tuple[str, ...] = ()) -> dict:
        """Average across processes, write to TensorBoard and metrics.jsonl, show `show` on the bar."""
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.accelerator.num_processes > 1:
            keys = sorted(metrics)
            values = self.accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=self.accelerator.device), "mean")  # fmt: skip
            metrics = dict(zip(keys, values.tolist()))
        if self.main:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if show:
                self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in show if k in metrics}, refresh=False)
        return metrics

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def write_samples(self, samples: list[dict], step: int, n_print: int = 4):
        if not self.main:
            return
        with open(self.dir / "samples.jsonl", "a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
        print_samples(samples[:n_print], step)

    def finish(self, final: dict):
        self.accelerator.wait_for_everyone()
        if self.main:
            (self.dir / "eval.json").write_text(json.dumps(final, indent=2))
            self.bar.close()
            self.writer.close()
            print(f"[run] {self.dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
        self.accelerator.end_training()


def print_samples(samples: list[dict], step: int):
    print(f"\n--- samples at step {step} ---")
    for s in samples:
        scores = "  ".join(f"{k}={v:.3f}" for k, v in s.items() if isinstance(v, float))
        print(f"{s['prompt'][-70:]!s:>70} | {s['completion']!r:<28} {scores}")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(policy, tokenizer, prompts, references, *, is_toy, max_prompt, max_new_tokens, batch_size=64,
             ref_model=None, reward_model=None, no_eos_score=-1.0):  # fmt: skip
    """Greedy completions for the prompts: reward-model score, length (tokens incl. EOS), EOS rate, and on
    the toy task gold reward and win rate against the reference summaries under the gold reward. With a
    reference model, also KL(pi || pi_ref) at temperature 1, estimated from samples as the mean over
    prompts of sum_t log pi/pi_ref. Returns (metrics, samples)."""
    was_training = policy.training
    policy.eval()
    pad_id, device = tokenizer.pad_token_id, next(policy.parameters()).device
    out = {"score": [], "length": [], "eos": [], "kl": [], "gold": [], "ref_gold": []}
    samples = []
    for i in range(0, len(prompts), batch_size):
        batch_prompts = prompts[i : i + batch_size]
        prompt = pad(tokenize_prompts(tokenizer, batch_prompts, max_prompt), pad_id, "left").to(device)
        completion, has_eos = generate(policy, prompt, tokenizer, max_new_tokens, temperature=0.0)
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        out["length"] += (completion != pad_id).sum(1).tolist()
        out["eos"] += has_eos.float().tolist()
        if reward_model is not None:
            out["score"] += reward_scores(reward_model, prompt, completion, pad_id, has_eos, no_eos_score).tolist()
        if ref_model is not None:  # KL on samples at temperature 1 (greedy samples would not estimate it)
            sampled, _ = generate(policy, prompt, tokenizer, max_new_tokens, temperature=1.0)
            logp = completion_logprobs(policy, prompt, sampled, pad_id).sum(1)
            out["kl"] += (logp - completion_logprobs(ref_model, prompt, sampled, pad_id).sum(1)).tolist()
        for j, text in enumerate(texts):
            sample = {"prompt": batch_prompts[j], "completion": text}
            if is_toy:
                gold = toy.gold_reward(batch_prompts[j], text, bool(has_eos[j]))
                out["gold"].append(gold)
                out["ref_gold"].append(toy.gold_reward(batch_prompts[j], references[i + j]))
                sample["gold"] = gold
            if out["score"]:
                sample["score"] = out["score"][i + j]
            samples.append(sample)
    policy.train(was_training)
    metrics = {f"eval/{k}": sum(v) / len(v) for k, v in out.items() if v and k != "ref_gold"}
    if is_toy:
        metrics["eval/win_rate"] = toy.win_rate(out["gold"], out["ref_gold"])
    return metrics, samples


def peak_memory_mb() -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextlib.contextmanager
def timer(times: dict, key: str):
    """Accumulate wall time of a block into times[key] (seconds)."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start
