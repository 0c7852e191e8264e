"""Shared plumbing for the algorithm scripts: setup, tokenization, generation, log-probs, reward scoring,
masked statistics, data loading, logging and evaluation. No algorithm logic lives here.

Tensor layout used everywhere: a batch is `prompt` [B, P] left-padded and `completion` [B, C]
right-padded, both with the tokenizer's dedicated pad id; the model sees `cat([prompt, completion])`
with `attention_mask = ids != pad` and `position_ids = cumsum(mask) - 1`, so left padding never
changes a logit. A completion is its tokens up to and including the first EOS, then padding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import functools
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, extract_model_from_parallel, set_seed
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


class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss or reward): reported as one line, exit code 1."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was saved at the end of the step; exit code 130."""


# fields that may differ between a run and its --resume: they change neither the data nor the result
RESUME_MAY_CHANGE = ("resume", "save_every", "track", "wandb_project")


def run_cli(args_cls, main):
    """`main(tyro.cli(Args))`, turning input mistakes and stopped runs into a one-line message and a
    non-zero exit. With --resume, the arguments come from the run's args.json."""
    import tyro

    try:
        args = tyro.cli(args_cls)
        main(resume_args(args_cls, args) if getattr(args, "resume", None) else args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(130)


def resume_args(args_cls, args):
    """The arguments of the run in `args.resume` (its args.json). An argument given on the command line
    must equal the saved one (a resumed run is the same run), except RESUME_MAY_CHANGE."""
    run_dir = Path(args.resume)
    if not (run_dir / "args.json").is_file():
        raise UserError(f"--resume {args.resume}: not a run directory (no args.json)")
    try:
        saved = json.loads((run_dir / "args.json").read_text())
    except ValueError:
        raise UserError(f"--resume {args.resume}: args.json is not valid JSON") from None
    fields = {f.name for f in dataclasses.fields(args_cls)}
    if set(saved) != fields:
        raise UserError(
            f"--resume {args.resume}: a run of another script (its arguments differ: {sorted(set(saved) ^ fields)})"
        )
    defaults = args_cls()
    for name in sorted(fields - set(RESUME_MAY_CHANGE) - {"output_dir", "run_name"}):
        given, default = getattr(args, name), getattr(defaults, name)
        if given != default and json.loads(json.dumps(given, default=str)) != saved[name]:
            raise UserError(
                f"--resume: --{name.replace('_', '-')} {given} differs from the run's {saved[name]} (a resumed run keeps its arguments)"
            )
    keep = {name: getattr(args, name) for name in RESUME_MAY_CHANGE if name in fields}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}  # JSON has no tuples
    return dataclasses.replace(args_cls(**saved), **keep, output_dir=str(run_dir.parent), run_name=run_dir.name)


def check_ranges(args, positive=(), non_negative=(), unit=()):
    """One-line errors for hyperparameters out of range: > 0, >= 0, or in [0, 1]."""
    for names, ok, want in (
        (positive, lambda v: v > 0, "> 0"),
        (non_negative, lambda v: v >= 0, ">= 0"),
        (unit, lambda v: 0 <= v <= 1, "in [0, 1]"),
    ):
        for name in names:
            value = getattr(args, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
                raise UserError(f"--{name.replace('_', '-')} {value} must be {want}")


# ---------------------------------------------------------------------------------------------
# Setup: accelerator, seed, precision
# ---------------------------------------------------------------------------------------------


TRUST_REMOTE_CODE = False  # set by setup() from --trust-remote-code; read by every from_pretrained


def setup(args) -> Accelerator:
    """One process on CPU or one GPU by default; `accelerate launch` / `torchrun` for more (DDP, DeepSpeed
    ZeRO-2/3 or FSDP from the launcher's config). bf16 autocast on CUDA (weights stay fp32 for the optimizer),
    fp32 on CPU. Each rank gets its own seed. Hub code (trust_remote_code) runs only when --trust-remote-code
    asks for it. Prints one line naming the setup."""
    global TRUST_REMOTE_CODE
    TRUST_REMOTE_CODE, seed = getattr(args, "trust_remote_code", False), args.seed
    if getattr(args, "track", False):  # before anything is written: a failed start leaves no run directory
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--track needs wandb: pip install wandb") from None
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    # without CUDA, cpu=True makes torchrun's ranks one DDP job, but would silently replace DeepSpeed by DDP:
    # DeepSpeed on CPU needs the gloo backend named instead
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    precision = "bf16" if cuda else "no"
    accelerator = Accelerator(cpu=not (cuda or deepspeed), mixed_precision=precision, kwargs_handlers=handlers)
    set_seed(seed + 100003 * accelerator.process_index)
    if accelerator.is_main_process:
        print(f"[setup] {describe_setup(accelerator)}", flush=True)
    return accelerator


def describe_setup(accelerator) -> str:
    """e.g. `2 processes, DeepSpeed ZeRO-3, cpu, fp32`."""
    kind = accelerator.distributed_type
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        how = f"DeepSpeed ZeRO-{plugin.zero_stage}"
    else:
        how = {DistributedType.FSDP: "FSDP", DistributedType.NO: "single process"}.get(kind, "DDP")
    n = accelerator.num_processes
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    return f"{n} process{'es' * (n > 1)}, {how}, {accelerator.device.type}, {precision}"


def prepare(accelerator: Accelerator, *objects, micro_batch_size: int):
    """accelerator.prepare, with what DeepSpeed needs filled in: its micro-batch size (it cannot read one
    from a dataloader here) and no gradient clipping (accelerate's "auto" would clip at 1.0 under DeepSpeed
    alone; the scripts clip nowhere). One call per script: DeepSpeed takes one model per Accelerator."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        config = plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = micro_batch_size
        if config.get("gradient_clipping", "auto") == "auto":
            config["gradient_clipping"] = 0.0
    return accelerator.prepare(*objects)


@contextlib.contextmanager
def accumulate(accelerator: Accelerator, model, last: bool):
    """Forward and backward of one micro-batch of a minibatch whose gradients accumulate: gradients are
    synchronized across processes (and a DeepSpeed engine, which steps inside `backward`, takes its
    optimizer step) only with the last micro-batch. The caller weights each micro-batch's loss so that the
    sum is the minibatch's loss, and calls optimizer.step() after the last one (a no-op under DeepSpeed)."""
    accelerator.sync_gradients = last
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        yield


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


PAD_TOKEN = "<|pad|>"  # the pad load_tokenizer adds, and the toy tokenizer's: the same id at every stage


def load_tokenizer(name: str):
    """Tokenizer with a dedicated pad token (never EOS: a model must see EOS in its loss to learn to
    stop) and left padding. A new pad id may lie outside the embedding; forward() never embeds it. The
    tokenizer as it came, with EOS as pad, is kept as `.without_added_pad` for `save_model`."""
    if name in ("toy", "toy-tiny"):
        tokenizer = toy.make_tokenizer()
        tokenizer.without_added_pad = toy.make_tokenizer(pad=False)
        return tokenizer
    tokenizer = _from_pretrained(AutoTokenizer, resolve_model(name))
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {name!r} has no EOS token; set one (tokenizer.eos_token) before training")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        original = copy.deepcopy(tokenizer)
        original.pad_token = original.eos_token
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})  # a token it already has (the toy's) keeps its id
        tokenizer.without_added_pad = original
    return tokenizer


def load_model(name: str, kind: str = "causal", dtype: torch.dtype = torch.float32, tokenizer=None, frozen=False):
    """AutoModelForCausalLM (kind="causal") or a 1-label AutoModelForSequenceClassification ("reward"),
    dropout off. `toy` / `toy-tiny` build a fresh ~1M / ~0.1M-parameter model for the toy task. A new
    scalar head gets std 1/sqrt(H+1) (N+). `tokenizer`: the policy's, for a frozen reward model that may
    come from elsewhere; when its own tokenizer differs, `reward_scores` re-tokenizes for it. `frozen`: a
    model that is never trained (reference, reward model), in frozen_dtype(), eval mode, without gradients,
    and whole on every process (under ZeRO-3 only the models given to accelerator.prepare are sharded)."""
    if frozen:
        with whole_weights():
            model = load_model(name, kind, frozen_dtype(), tokenizer)
        return model.eval().requires_grad_(False)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1}
    if name == "toy-gold" and kind == "reward":  # the gold oracle: toy-rm's network (a PPO critic may start from
        model = load_model("toy-rm", kind, dtype)  # it), whose scores reward_scores() replaces by the gold reward
        model.config.toy_gold = True
        return model
    if name in ("toy", "toy-tiny"):
        config = toy.model_config({"toy": "small", "toy-tiny": "tiny"}[name])
        with whole_weights():  # built whole as without DeepSpeed (ZeRO-3 then shards rank 0's weights)
            model, missing = cls.from_config(config.__class__(**{**config.to_dict(), **extra})), ["score.weight"]
    else:
        model, info = _from_pretrained(cls, resolve_model(name), dtype=dtype, output_loading_info=True, **extra)
        missing = info["missing_keys"]
    if kind == "reward" and any(k.startswith("score.") for k in missing):  # fresh head: N+ init
        with gathered_weights(model.score, modifier_rank=0):  # ZeRO-3 loads it sharded
            torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    disable_dropout(model)
    if kind == "reward" and tokenizer is not None:
        own = load_tokenizer(name)
        if own.get_vocab() != tokenizer.get_vocab() or own.eos_token_id != tokenizer.eos_token_id:
            print(f"[reward] {name} has its own tokenizer: completions are decoded and re-tokenized for it")
            model.retokenize = (tokenizer, own)
    return model


@contextlib.contextmanager
def whole_weights():
    """Models loaded in this block are not sharded. Under ZeRO-3, transformers reads accelerate's DeepSpeed
    config and shards every model it loads; a model that accelerator.prepare never sees must stay whole."""
    if zero_stage() != 3:
        yield
        return
    from accelerate.state import AcceleratorState
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


def _from_pretrained(cls, name, **kwargs):
    try:
        return cls.from_pretrained(name, trust_remote_code=TRUST_REMOTE_CODE, **kwargs)
    except OSError as e:
        offline = " (offline: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(
            f"cannot load {name!r}{offline}: not a local directory and not loadable from the Hub ({str(e).splitlines()[0]})"
        ) from None


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def trainable(model, args):
    """The training-side options of a model that will be trained: training mode, gradient checkpointing
    (recompute activations in the backward pass, trading compute for memory) and, for a policy, LoRA adapters.
    from_pretrained returns eval mode, and transformers checkpoints only in training mode; dropout is off,
    so training mode changes nothing else (evaluate() and generate() switch to eval mode and back)."""
    model.train()
    if getattr(args, "gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(policy, r: int, alpha: float):
    """LoRA adapters (peft) on every linear layer of the policy; only they train. r = 0: the policy itself."""
    if not r:
        return policy
    if r < 0 or not alpha > 0:
        raise UserError(f"--lora-r {r} must be >= 0 and --lora-alpha {alpha} > 0")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora-r needs peft: pip install peft") from None
    return get_peft_model(
        policy, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )


class AdapterDisabled:
    """pi_ref of a LoRA policy: the same model with its adapters switched off, so no second copy of the
    weights is held. Called and generated from like a model; never trains."""

    def __init__(self, policy):
        self.policy = policy  # the peft model itself, not a DDP/DeepSpeed wrapper

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy.generate(*args, **kwargs)

    def __getattr__(self, name):  # config, generation_config, training, parameters, eval, train...
        return getattr(self.policy, name)

    def __setattr__(self, name, value):
        if name == "policy":
            object.__setattr__(self, name, value)
        else:
            setattr(self.policy, name, value)


class PolicyAndCritic(torch.nn.Module):
    """The policy and its critic as one module, for PPO-style scripts: one accelerator.prepare (DeepSpeed trains
    one model per Accelerator) and one forward for both (DDP synchronizes the gradients of what its forward
    ran). The forward returns the policy's output with `critic_values`: the critic's head at every position."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, logits_to_keep=None, **inputs):
        out = self.policy(**inputs, logits_to_keep=logits_to_keep)
        hidden = self.critic.base_model(**inputs).last_hidden_state
        out["critic_values"] = self.critic.score(hidden).squeeze(-1)
        return out


def reference_model(name: str, policy, lora_r: int, device):
    """The frozen reference pi_ref: the adapter-disabled policy under LoRA, else a separate copy of `name`
    in eval mode, without gradients, in frozen_dtype()."""
    if lora_r:
        return AdapterDisabled(policy)
    return load_model(name, frozen=True).to(device)


def save_model(accelerator, model, tokenizer, path: Path, part: str | None = None):
    """The final model, whole, with its tokenizer, at the end of a run (call on every process: under ZeRO-3/FSDP
    the weights are gathered first); `part`: only that submodule of `model`. A LoRA policy is saved merged, so
    later stages load it like any model, and its adapter alone goes to path/adapter. The saved pad settings are
    the ones transformers and vLLM need (`policy_tokenizer`, `reward_model_outputs`); the model's config is
    changed to match."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    if part is not None:  # one submodule: the policy of a PolicyAndCritic
        model = getattr(model, part)
        state_dict = {k.removeprefix(f"{part}."): v for k, v in state_dict.items() if k.startswith(f"{part}.")}
    if hasattr(model, "merge_and_unload"):  # peft
        model.save_pretrained(path / "adapter")
        policy_tokenizer(tokenizer, model.get_base_model()).save_pretrained(path / "adapter")
        model, state_dict = model.merge_and_unload(), None  # the merged weights are the state dict now
    if model.can_generate():
        tokenizer = policy_tokenizer(tokenizer, model)
    else:
        tokenizer, state_dict = reward_model_outputs(tokenizer, model, state_dict)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)


def policy_tokenizer(tokenizer, model):
    """The tokenizer a causal LM is saved with. A pad the scripts added, or one without an embedding row, gives
    way to EOS (the tokenizer as it came, without the added token): the model's vocabulary stays the one it
    was trained on, so it can emit no untrained token, and transformers or vLLM pad prompts with EOS (the
    attention mask hides them). The next stage adds its own pad again, with the same id. Sets the pad id of
    the model's config and generation config to the saved tokenizer's."""
    original = getattr(tokenizer, "without_added_pad", None)
    if original is not None or tokenizer.pad_token_id >= model.config.get_text_config().vocab_size:
        tokenizer = copy.deepcopy(original if original is not None else tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.init_kwargs["padding_side"] = "left"  # save_pretrained writes init_kwargs: generation pads on the left
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def reward_model_outputs(tokenizer, model, state_dict):
    """(tokenizer, state dict) a reward model is saved with. It keeps its pad, which is never EOS: the
    classifier's pooling reads the last token that is not padding, the EOS the score belongs at. A pad
    without an embedding row gets one (the mean row; padding is masked, so its value never counts). The
    tokenizer pads on the right, where models with absolute positions (GPT-2) need no position ids. Sets
    config.pad_token_id (without it transformers refuses batches of more than one)."""
    pad_id, config = tokenizer.pad_token_id, model.config.get_text_config()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "right"
    if pad_id >= config.vocab_size:
        weight = model.get_input_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is weight)
        rows = state_dict[name]
        new = rows.mean(0, keepdim=True).expand(pad_id + 1 - len(rows), -1)
        state_dict, config.vocab_size = {**state_dict, name: torch.cat([rows, new])}, pad_id + 1
    model.config.pad_token_id = pad_id
    return tokenizer, state_dict


# ---------------------------------------------------------------------------------------------
# Data: loading, known formats, chat templates, tokenization, padding
# ---------------------------------------------------------------------------------------------


def load_data(name: str, split: str, columns: tuple[str, ...]) -> datasets.Dataset:
    """`toy` (prompt/completion or prompt/chosen/rejected, chosen by `columns`), a `save_to_disk` directory,
    a .json/.jsonl/.parquet/.csv file, or a Hub id. Known layouts become the standard columns (see
    `standardize`); checks the columns and that the split is not empty."""
    if name == "toy":
        data = (toy.preference_dataset if "chosen" in columns else toy.sft_dataset)(split)
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
    """An empty or malformed file fails inside `datasets` (StopIteration, ValueError "corresponds to no data",
    IndexError for an empty save_to_disk...): one line instead."""
    try:
        return load(*args, **kwargs)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read dataset {name!r}: empty or malformed ({detail})") from None


def _pick_split(data: datasets.DatasetDict, split: str, name: str, columns: tuple[str, ...] = ()) -> datasets.Dataset:
    """`split`, else the Hub's other names for it: `validation` for `test` (trl-lib/tldr-preference), and
    `<split>_prefs` / `<split>_sft` / `<split>_gen` by the data the script asks for (ultrafeedback_binarized).
    Data with a train split but no test split (a file, a saved dataset, a Hub dataset with train only): its last
    10% (at least 1 row, at most 500) are held out as the test split and the train split is the rows before
    them, so evaluation never sees a training row."""
    if split in ("train", "test") and _find_split(data, "test", columns) is None:
        train = _find_split(data, "train", columns)
        if train is not None:
            return _held_out(data[train], split, name)
    candidates = _split_names(split, columns)
    for s in candidates:
        if s in data:
            if s != split:
                print(f"[data] {name!r}: split {s!r} as the {split} split")
            return data[s]
    raise UserError(f"dataset {name!r} has no split {split!r} (nor {candidates[1:]}); it has {list(data)}")


def _split_names(split: str, columns: tuple[str, ...]) -> list[str]:
    kind = ["prefs"] if "chosen" in columns else ["sft"] if "completion" in columns else ["gen", "prefs", "sft"]
    return [split] + (["validation"] if split == "test" else []) + [f"{split}_{k}" for k in kind]


def _find_split(data: datasets.DatasetDict, split: str, columns: tuple[str, ...]) -> str | None:
    return next((s for s in _split_names(split, columns) if s in data), None)


_HELD_OUT_SHOWN = set()  # the datasets whose split was printed (scripts load train and test separately)


def _held_out(data: datasets.Dataset, split: str, name: str) -> datasets.Dataset:
    """The rows of `data` before its held-out last 10% (split "train"), or those (split "test")."""
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
    """TRL's standard columns (prompt; prompt/completion; prompt/chosen/rejected), plain text or conversational
    (lists of {"role", "content"}), from the known layouts that lack them:
    - `messages` (ultrafeedback_binarized train_sft, UltraChat), when a completion is asked for or there is
      no `chosen`: the last assistant turn is the completion, the turns before it the prompt;
    - implicit prompt, `chosen`/`rejected` as whole dialogues (Anthropic/hh-rlhf transcripts, or
      ultrafeedback_binarized's message lists beside its plain `prompt` string): split by `split_dialogues`;
    - `completion` asked of preference data: the chosen responses (SFT on the preferred answers, as in DPO's HH).
    Rows already in a standard layout pass through unchanged."""
    cols, first = set(data.column_names), data[0]
    use_messages = "messages" in cols and is_conversation(first["messages"]) and "completion" not in cols
    if use_messages and ("completion" in columns or "chosen" not in cols):
        messages = list(data["messages"])
        ends = [bool(m) and m[-1]["role"] == "assistant" for m in messages]
        if "completion" in columns and not all(ends):
            raise UserError(
                f"{name}: row {ends.index(False)}'s `messages` does not end with an assistant turn (the completion)"
            )
        return datasets.Dataset.from_dict(
            {
                "prompt": [m[:-1] if e else m for m, e in zip(messages, ends)],
                "completion": [m[-1:] if e else [] for m, e in zip(messages, ends)],
            }
        )
    if {"chosen", "rejected"} <= cols and (
        "prompt" not in cols or (is_conversation(first["chosen"]) and not is_conversation(first["prompt"]))
    ):
        rows = [
            split_dialogues(c, r, f"{name} row {i}") for i, (c, r) in enumerate(zip(data["chosen"], data["rejected"]))
        ]
        data = datasets.Dataset.from_dict(dict(zip(("prompt", "chosen", "rejected"), map(list, zip(*rows)))))
    if "completion" in columns and "completion" not in data.column_names and "chosen" in data.column_names:
        print(f"[data] {name} has no `completion` column: the `chosen` responses are the completions")
        data = data.rename_column("chosen", "completion")
    return data


def is_conversation(x) -> bool:
    """A list of {"role", "content"} messages (TRL's conversational format), rather than plain text."""
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


HH_ASSISTANT = "\n\nAssistant:"


def split_dialogues(chosen, rejected, where: str = "row") -> tuple:
    """Two whole dialogues that share a prompt -> (prompt, chosen continuation, rejected continuation).
    Message lists: the prompt is the messages they share (at least the last one is a continuation).
    Anthropic HH transcripts (`\\n\\nHuman: ...\\n\\nAssistant: ...`): the prompt is their common prefix cut
    after its last `\\n\\nAssistant:`, multi-turn included; the continuations start with the space after
    it, as TL;DR's " " + summary (so a byte-level BPE sees " word" as one token)."""
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
        raise UserError(
            f"{where}: no prompt column, and `chosen`/`rejected` share no '\\n\\nAssistant:' turn to split at"
        )
    end += len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def chat_text(tokenizer, prompt, completion=None) -> tuple[str, str | None]:
    """Conversational rows -> text with the tokenizer's chat template: the prompt with the assistant's
    generation prompt (no system prompt added here), the completion as the template writes the reply, cut
    after its first EOS (so the end of turn is the EOS the policy learns to stop at). Text passes through."""
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
    # a template that renders a finished reply differently from its generation prompt: the reply's text alone
    reply = full[len(text) :] if full.startswith(text) else "".join(m["content"] for m in completion)
    eos = tokenizer.eos_token
    return text, reply[: reply.index(eos) + len(eos)] if eos in reply else reply


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text; a text that already starts with the BOS token (chat templates write it) gets
    no second one from the tokenizer."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    if not any(has_bos):
        return tokenizer(texts)["input_ids"]
    return [tokenizer(t, add_special_tokens=not b)["input_ids"] for t, b in zip(texts, has_bos)]


def tokenize_pair(tokenizer, prompt, completion, max_prompt: int, max_completion: int) -> tuple[list, list]:
    """Token ids of (prompt, completion + EOS), from text or messages (`chat_text`). Tokenizes prompt and
    prompt+completion and splits at their common prefix, so merges across the boundary and BOS/chat
    templates are counted once. Long prompts keep their *end* (BOS kept); long completions are cut to
    `max_completion` (EOS may be lost)."""
    prompt, completion = chat_text(tokenizer, prompt, completion)
    p_ids, full = encode(tokenizer, [prompt, prompt + completion])
    k = 0
    while k < min(len(p_ids), len(full)) and p_ids[k] == full[k]:
        k += 1
    prompt_ids, completion_ids = full[:k], full[k:]
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return truncate_prompt(prompt_ids, max_prompt, tokenizer.bos_token_id), completion_ids[:max_completion]


def truncate_prompt(ids: list, max_len: int, bos_id: int | None) -> list:
    """The last `max_len` tokens, the BOS first if there was one: the end of a long post (TL;DR:) or of a
    conversation (the last turns and the assistant header) is what the completion continues."""
    if len(ids) <= max_len:
        return ids
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - (max_len - len(head)) :]


def pad(seqs: list[list[int]], pad_id: int, side: str) -> torch.Tensor:
    """List of id lists -> [B, max_len] tensor, padded on the left or the right."""
    width = max(len(s) for s in seqs)
    rows = [([pad_id] * (width - len(s)) + s) if side == "left" else (s + [pad_id] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def tokenize_prompts(tokenizer, prompts: list, max_prompt: int) -> list[list[int]]:
    """Token ids of prompts (text or messages), truncated as in `truncate_prompt`."""
    texts = [chat_text(tokenizer, p)[0] for p in prompts]
    return [truncate_prompt(ids, max_prompt, tokenizer.bos_token_id) for ids in encode(tokenizer, texts)]


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
def generate(
    model,
    prompt: torch.Tensor,
    tokenizer,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    logits_processor=None,
    return_logprobs: bool = False,
):
    """Sample completions for left-padded prompts ([B, P] -> [B, C]) at `temperature` (0 = greedy), then
    pad everything after the first EOS. Returns (completion, has_eos), and with `return_logprobs` also the
    per-token log-probs [B, C] of the sampled tokens under softmax(logits / T), 0 on padding: what
    completion_logprobs computes (to ~1e-5, from the KV-cached logits), without another forward.
    transformers' generate() runs the model (KV cache, stopping, padding); the draw itself is InverseCdfSampler."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p} must be in (0, 1]")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    mask = prompt != pad_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,  # greedy over the sampler's one-hot scores = its draw
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=tokenizer.bos_token_id,
        suppress_tokens=[pad_id] if pad_id < model.config.vocab_size else None,  # a sampled pad would read as padding
    )
    recorder = SampledLogprobs(temperature) if return_logprobs else None
    sampler = [InverseCdfSampler(temperature, top_p)] if temperature > 0 else []
    # the recorder sees the model's logits, the sampler draws last (after a caller's forced tokens)
    processors = ([recorder] if recorder else []) + list(logits_processor or []) + sampler
    # transformers fills unset fields from the checkpoint's generation_config.json (repetition_penalty,
    # min_p...): sample from softmax(logits / T) only, which is what completion_logprobs scores
    default, model.generation_config = model.generation_config, GenerationConfig()
    was_training = model.training
    model.eval()  # gradient checkpointing turns the KV cache off in training mode
    try:
        with gathered_weights(model):
            out = model.generate(
                input_ids=prompt.masked_fill(~mask, 0),
                attention_mask=mask.long(),
                generation_config=config,
                logits_processor=processors or None,
            )
    finally:
        model.generation_config = default
        model.train(was_training)
    completion, has_eos = truncate_after_eos(out[:, prompt.shape[1] :], eos_id, pad_id)
    if recorder is None:
        return completion, has_eos
    return completion, has_eos, recorder.result(out[:, -1]).masked_fill(completion == pad_id, 0.0)


class InverseCdfSampler(transformers.LogitsProcessor):
    """Draws one token per row from softmax(scores / T) (within the top-p nucleus when top_p < 1) by inverting
    the cumulative distribution with one uniform number per row, and returns scores that are 0 at the draw
    and -inf elsewhere, which generate()'s greedy step then picks. torch.multinomial, which generate() would
    use, draws an exponential number for every vocabulary entry: most of a step's time with a 32k vocabulary."""

    def __init__(self, temperature: float, top_p: float = 1.0):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        index = None
        if self.top_p < 1:  # the smallest set of most likely tokens whose mass reaches top_p (at least one)
            probs, index = probs.sort(dim=-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # uniform on [0, total mass)
        token = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)  # first entry with cdf > u
        if index is not None:
            token = index.gather(-1, token)
        return torch.full_like(scores, -float("inf")).scatter_(-1, token, 0.0)


class SampledLogprobs(transformers.LogitsProcessor):
    """Keeps log softmax(logits / T) of the last step only (one [B, V] tensor, not one per step) and, at the
    next step, the log-prob of the token sampled from it. Placed before generate's own processors that
    force tokens (DR-PO's prefix), after the pad suppression that completion_logprobs applies too."""

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError("sampled log-probs need a temperature > 0")
        self.temperature, self.last, self.logps = temperature, None, []

    def __call__(self, input_ids, scores):
        self.take(input_ids[:, -1])
        self.last = F.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def take(self, sampled: torch.Tensor):
        if self.last is not None:  # the token just sampled from the kept distribution
            self.logps.append(self.last.gather(-1, sampled[:, None]).squeeze(-1))
            self.last = None

    def result(self, last_sampled: torch.Tensor) -> torch.Tensor:
        self.take(last_sampled)
        return torch.stack(self.logps, 1)


def zero_stage() -> int:
    """The DeepSpeed ZeRO stage of this run (0: no DeepSpeed)."""
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    return 0 if plugin is None else plugin.zero_stage


def gathered_weights(model, modifier_rank: int | None = None):
    """Under DeepSpeed ZeRO-3, gather the sharded weights of `model` for the block: once for a whole
    generate() call (otherwise every layer is gathered again at every new token), or to write them
    (`modifier_rank`: that process's values are kept); elsewhere, nothing."""
    if zero_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def shared_prompt_forward(model, prompt, completion, pad_id, logits_to_keep: int | torch.Tensor | None = None):
    """Forward of k completions per prompt with each prompt computed once. `prompt` is [B, P] (left-padded),
    `completion` [k*B, C] (right-padded) laid out [all first completions; all second; ...]. The prompts run
    alone, each row of their KV cache is repeated k times, and the completions run on it: under causal
    attention this is the same computation as k forwards of cat([prompt, completion]), without repeating the
    prompt tokens (DPO's chosen and rejected, XPO's y and y~). The completions run grouped by prompt
    (row r of the completion output is completion row order[r]): the cache is repeat-interleaved, whose
    gradient is a cheap sum, where tiling it would need a scatter. With `logits_to_keep`, a causal LM's
    prompt output keeps the logits of the last prompt position only, the completion output those that
    `logits_to_keep` selects (a count of last positions, or their indices). Returns (prompt output, completion
    output, order), or None where a cache cannot be shared (no prompt tokens, gradient checkpointing, a
    model without a KV cache)."""
    inner = extract_model_from_parallel(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft: the transformers model
    if hasattr(inner, "is_activation_checkpointing"):  # the name since transformers 5.x
        checkpointing = inner.is_activation_checkpointing
    else:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if prompt.shape[1] == 0 or (checkpointing and inner.training):  # checkpointing turns the cache off in training
        return None
    # the cache's argument and output field: `cache` in recent transformers, `past_key_values` before
    name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    k, mask, comp_mask = completion.shape[0] // prompt.shape[0], prompt != pad_id, completion != pad_id
    keep = lambda n: {} if logits_to_keep is None else {"logits_to_keep": n}  # noqa: E731
    first = forward(model, prompt, pad_id, use_cache=True, **keep(1))
    cache = getattr(first, name, None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(k)  # out of place: gradients flow back into the prompt's forward
    order = torch.arange(completion.shape[0], device=completion.device).view(k, -1).T.reshape(-1)  # grouped by prompt
    completion, comp_mask = completion[order], comp_mask[order]
    full_mask = torch.cat([mask.repeat_interleave(k, 0), comp_mask], 1)  # completions attend to the real prompt tokens
    position_ids = (full_mask.cumsum(1) - 1).clamp(min=0)[:, prompt.shape[1] :]
    second = model(
        input_ids=completion.masked_fill(~comp_mask, 0),
        attention_mask=full_mask.long(),
        position_ids=position_ids,
        use_cache=True,
        **{name: cache},
        **keep(logits_to_keep),
    )
    return first, second, order


def completion_logprobs(model, prompt, completion, pad_id, temperature=1.0, chunk_rows=16, with_entropy=False):
    """Per-token log pi(y_t | x, y_<t) of the completion tokens, [B, C], 0 on padding. Logits come only
    for completion positions (`logits_to_keep`), are divided by the sampling temperature, and go
    through an fp32 log-softmax a few rows at a time (`TokenLogprobs`: the model's logits are the only
    vocabulary-sized tensor kept for the backward pass). `completion` may hold k completions per prompt
    (k * B rows, laid out as in `shared_prompt_forward`): each prompt then runs once. A pad token with a
    vocabulary row of its own (Pythia's <|padding|>, Qwen's <|endoftext|>) is masked out of the softmax:
    generate() never samples it, on-policy terms (PPO ratio, KL) must score the distribution that sampled,
    and offline data (DPO, SFT) is scored by the same one, so every stage trains one policy. TRL scores the
    plain softmax: per token, the two differ by log(1 - p(pad))."""
    C, k = completion.shape[1], completion.shape[0] // prompt.shape[0]
    if completion.shape[0] != k * prompt.shape[0]:
        raise ValueError(f"{completion.shape[0]} completions for {prompt.shape[0]} prompts: not a multiple")
    if prompt.shape[1] == 0:
        raise ValueError("completion_logprobs needs at least one prompt token (the first completion token's context)")
    # logits at exactly the positions that predict completion tokens (index tensors: a slice of the logits
    # would allocate a zero-filled gradient the size of all of them in the backward pass)
    keep = lambda start, n: torch.arange(start, start + n, device=completion.device)  # noqa: E731
    shared = shared_prompt_forward(model, prompt, completion, pad_id, keep(0, max(C - 1, 1))) if k > 1 else None
    if shared is not None:  # logit of y_1 at the last prompt position, of y_t+1 at completion position t
        first, second, order = shared
        parts = [first.logits[:, -1:].repeat_interleave(k, 0)] + ([second.logits] if C > 1 else [])  # [kB, 1 | C-1, V]
    else:
        parts = [
            forward(
                model,
                torch.cat([prompt.repeat(k, 1), completion], 1),
                pad_id,
                logits_to_keep=keep(prompt.shape[1] - 1, C),
            ).logits
        ]
        order = torch.arange(completion.shape[0], device=completion.device)
    targets = completion[order].masked_fill(completion[order] == pad_id, 0)  # in the rows' order of the logits
    columns, t = [], 0
    for logits in parts:  # views of the model's logits: nothing vocabulary-sized is copied
        columns.append(
            TokenLogprobs.apply(
                logits, targets[:, t : t + logits.shape[1]], temperature, pad_id, chunk_rows, with_entropy
            )
        )
        t += logits.shape[1]
    back, valid = torch.argsort(order), completion != pad_id  # back to the layout of `completion`
    out = torch.cat(columns, 1)[back].masked_fill(~valid[..., None], 0.0)
    return (out[..., 0], out[..., 1]) if with_entropy else out[..., 0]


def token_logprobs(logits, completion, pad_id, temperature=1.0, chunk_rows=16):
    """Per-token log-probs [B, C] of the completion tokens from the logits [B, C, V] that predict them (as
    completion_logprobs, for a caller that runs the forward itself), 0 on padding."""
    targets = completion.masked_fill(completion == pad_id, 0)
    out = TokenLogprobs.apply(logits, targets, temperature, pad_id, chunk_rows, False)[..., 0]
    return out.masked_fill(completion == pad_id, 0.0)


class TokenLogprobs(torch.autograd.Function):
    """[N, T, V] logits -> [N, T, 1 or 2]: log softmax(z)[target] and, `with_entropy`, the entropy of
    softmax(z), z = logits / temperature (fp32, an in-vocabulary pad id masked out), `chunk_rows` rows at a
    time. The softmax is recomputed in the backward pass, which writes the logits' gradient chunk by chunk
    into one tensor, so the logits are the only vocabulary-sized tensor alive between the passes (autograd
    through a log_softmax would keep its output, and the backward of each chunk's slice would allocate a
    zero-filled gradient the size of all the logits)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, pad_id, chunk_rows, with_entropy):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(*logits.shape[:-1], 1 + with_entropy, dtype=dtype, device=logits.device)
        for i in range(0, logits.shape[0], chunk_rows):
            logp = _scaled_log_softmax(logits[i : i + chunk_rows], temperature, pad_id)
            out[i : i + chunk_rows, :, 0] = logp.gather(-1, targets[i : i + chunk_rows, :, None]).squeeze(-1)
            if with_entropy:
                out[i : i + chunk_rows, :, 1] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits, targets, out)
        ctx.temperature, ctx.pad_id, ctx.chunk_rows = temperature, pad_id, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, out = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(i, i + ctx.chunk_rows)
            logp = _scaled_log_softmax(logits[rows], ctx.temperature, ctx.pad_id)
            g_logp = grad_out[rows, :, 0, None]
            # d log p_y / dz = onehot(y) - p;   d H / dz = -p * (log p + H)
            if out.shape[-1] == 2:
                g = -logp.exp() * (g_logp + grad_out[rows, :, 1, None] * (logp + out[rows, :, 1, None]))
            else:
                g = logp.exp_().mul_(-g_logp)  # in place: logp is not needed again
            g.scatter_add_(-1, targets[rows, :, None], g_logp)
            if ctx.pad_id < g.shape[-1]:
                g[..., ctx.pad_id] = 0.0  # the masked logit is a constant
            grad[rows] = g / ctx.temperature
        return grad, None, None, None, None, None


def _scaled_log_softmax(logits, temperature, pad_id):
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32
    if pad_id < scaled.shape[-1]:  # generate() never samples an in-vocabulary pad: score that same distribution
        scaled[..., pad_id] = torch.finfo(scaled.dtype).min
    return F.log_softmax(scaled, dim=-1)


def last_token_index(prompt: torch.Tensor, completion: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index (in cat([prompt, completion])) of the last real completion token: the EOS, or the final
    token when there is no EOS."""
    return prompt.shape[1] + (completion != pad_id).sum(1) - 1


def token_scores(model, prompt: torch.Tensor, completion: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per-token outputs [k*B, P + C] of the scalar head (`.score`) of a 1-label AutoModelForSequenceClassification
    on cat([prompt, completion]); k completions per prompt share its forward (`shared_prompt_forward`).
    They come from the model's own forward, read by a hook on the head: a DDP or DeepSpeed wrapper sees
    the whole forward (so gradients are synchronized), and no architecture's pooling is relied on."""
    inner = extract_model_from_parallel(model)
    captured = []
    hook = inner.score.register_forward_hook(lambda module, args, output: captured.append(output.squeeze(-1)))
    config = inner.config.get_text_config()
    pad_before = config.pad_token_id
    if pad_before is None:  # the model's own pooling (unused here) refuses batches without a pad id
        config.pad_token_id = pad_id
    k = completion.shape[0] // prompt.shape[0]
    try:
        shared = shared_prompt_forward(model, prompt, completion, pad_id) if k > 1 else None
        if shared is None:
            captured.clear()
            forward(model, torch.cat([prompt.repeat(k, 1), completion], 1), pad_id)
    finally:
        hook.remove()
        config.pad_token_id = pad_before
    if shared is None:
        return captured[0]
    return torch.cat([captured[0].repeat_interleave(k, 0), captured[1]], 1)[torch.argsort(shared[2])]


def reward_scores(reward_model, prompt, completion, pad_id, has_eos=None, no_eos_score: float | None = None):
    """Reward-model score read at the EOS token (the last real token), minus the stored normalization
    bias. Completions without EOS get `no_eos_score` instead (N+ replaces the score by -1). `completion` may
    hold k completions per prompt, as in `shared_prompt_forward` (each prompt then runs once). A reward model
    with its own tokenizer (`load_model(..., tokenizer=)`) scores its re-tokenization (`retokenize`);
    `--reward-model toy-gold` scores with the toy task's gold reward of the decoded text instead."""
    config = extract_model_from_parallel(reward_model).config
    k = completion.shape[0] // prompt.shape[0]  # completions per prompt (`shared_prompt_forward`)
    if getattr(config, "toy_gold", False):
        scores = toy_gold_scores(prompt.repeat(k, 1), completion, pad_id)
    else:
        if getattr(reward_model, "retokenize", None) is not None:
            prompt, completion, pad_id = retokenize(prompt.repeat(k, 1), completion, *reward_model.retokenize)
        scores = token_scores(reward_model, prompt, completion, pad_id)
        idx = last_token_index(prompt, completion, pad_id)
        scores = scores[torch.arange(len(idx), device=idx.device), idx].float()
        scores = scores - getattr(config, "reward_bias", 0.0)
    if has_eos is not None and no_eos_score is not None:
        scores = torch.where(has_eos, scores, torch.full_like(scores, no_eos_score))
    return scores


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


def retokenize(prompt, completion, tokenizer, rm_tokenizer):
    """Policy ids -> the reward model's: decode prompt + completion (without the policy's pad, leading BOS
    and EOS; one decode, so word boundaries survive) and encode the text with the RM's tokenizer (its own
    BOS if it adds one), appending its EOS where the completion had one. Returns (empty [B, 0] prompt,
    [B, L] right-padded with the RM's pad, the RM's pad id): the score is then read at the last token."""
    pad_id, bos_id, eos_id = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    texts, ended = [], []
    for p, c in zip(prompt.tolist(), completion.tolist()):
        p, c = [t for t in p if t != pad_id], [t for t in c if t != pad_id]
        if p and p[0] == bos_id:
            p = p[1:]
        ended.append(eos_id in c)
        texts.append(tokenizer.decode(p + (c[: c.index(eos_id)] if eos_id in c else c)))
    ids = [i + [rm_tokenizer.eos_token_id] * e for i, e in zip(encode(rm_tokenizer, texts), ended)]
    full = pad(ids, rm_tokenizer.pad_token_id, "right").to(completion.device)
    return full[:, :0], full, rm_tokenizer.pad_token_id


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
    """runs/<run_name>/ with args.json, TensorBoard events, metrics.jsonl, samples.jsonl and checkpoint/.
    Only the main process writes; metrics are averaged across processes before logging.

    A new run refuses a directory that already holds one. With --resume, metrics.jsonl and samples.jsonl
    are cut back to the checkpoint's step (the lines after it are written again), and `resume()` loads the
    checkpoint. Ctrl-C / SIGTERM ask the loop to stop: `step_done()` then saves a checkpoint and raises
    Interrupted; a second Ctrl-C stops at once."""

    def __init__(self, args, accelerator: Accelerator, total: int):
        self.accelerator, self.args = accelerator, args
        name = args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"
        self.dir = Path(args.output_dir) / name
        self.ckpt = self.dir / "checkpoint"
        self.main = accelerator.is_main_process
        self.writer = self.bar = None
        self.accelerators, self.models, self.stop_signal, self.closed = [accelerator], [], None, False
        resume_step = None
        if getattr(args, "resume", None):
            if (self.dir / "eval.json").exists():
                raise UserError(f"--resume {self.dir}: the run has finished (eval.json exists)")
            resume_step, self.resume_from = find_checkpoint(self.dir)
        elif (self.dir / "args.json").exists():
            raise UserError(
                f"{self.dir} already holds a run: continue it with --resume {self.dir}, or choose another --run-name"
            )
        accelerator.wait_for_everyone()  # every rank has checked before the main one writes
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            self.dir.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                (self.dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str))
            else:
                for log in ("metrics.jsonl", "samples.jsonl"):
                    cut_log(self.dir / log, resume_step)
            self.writer = SummaryWriter(str(self.dir), purge_step=None if resume_step is None else resume_step + 1)
            self.bar = tqdm(
                total=total,
                initial=resume_step or 0,
                desc=args.exp_name,
                dynamic_ncols=True,
                file=sys.stdout,
                mininterval=1 if sys.stdout.isatty() else 10,
            )
            if args.track:
                self._start_wandb(name, new_run=resume_step is None)
        for sig in (signal.SIGINT, signal.SIGTERM):
            if threading_main():
                signal.signal(sig, self._on_signal)

    def _start_wandb(self, name: str, new_run: bool):
        """wandb.init; when it fails (no login, no network), a new run's directory is removed, so the same
        --run-name can start afresh."""
        import wandb

        try:
            wandb.init(
                project=self.args.wandb_project,
                name=name,
                config=dataclasses.asdict(self.args),
                sync_tensorboard=True,
                resume="allow",
                id=name,
            )
        except Exception as e:
            self.close()
            if new_run:
                shutil.rmtree(self.dir, ignore_errors=True)
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--track: wandb did not start ({detail}); `wandb login`, or leave out --track") from None

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None or self.closed:  # the second one (or a finished run): stop now
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        print(
            f"\n[run] {self.stop_signal}: saving a checkpoint at the end of this step (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def log(self, metrics: dict, step: int, show: tuple[str, ...] = ()) -> dict:
        """Average across processes, write to TensorBoard and metrics.jsonl, show `show` on the bar."""
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.accelerator.num_processes > 1:
            keys = sorted(metrics)
            values = self.accelerator.reduce(
                torch.tensor([metrics[k] for k in keys], device=self.accelerator.device), "mean"
            )
            metrics = dict(zip(keys, values.tolist()))
        if self.main:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if show:
                self.bar.set_postfix(
                    {k.split("/")[-1]: f"{metrics[k]:.3g}" for k in show if k in metrics}, refresh=False
                )
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

    # ---- checkpoints ----

    def resume(self, *accelerators, **objects) -> dict | None:
        """Name what a checkpoint holds beyond what `accelerator.prepare` returned (its models and optimizers,
        which `accelerator.save_state` saves: DeepSpeed engines as their own sharded checkpoints): objects
        with a state_dict (the scheduler), and any further Accelerator (a second DeepSpeed engine). With
        --resume, load them all with every process's RNG states, and return the loop state this process
        saved (step, data position...); else None."""
        self.accelerators = [self.accelerator, *accelerators]
        for obj in objects.values():
            self.accelerator.register_for_checkpointing(obj)
        self.models = [m for acc in self.accelerators for m in acc._models]
        if not getattr(self.args, "resume", None):
            return None
        try:
            for i, acc in enumerate(self.accelerators):
                acc.load_state(str(self.resume_from / f"accelerator_{i}"))
            state = torch.load(self.resume_from / f"state_{self.accelerator.process_index}.pt", weights_only=True)
        except Exception as e:  # a truncated or hand-edited checkpoint: say which, never a traceback
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--resume {self.dir}: corrupt checkpoint ({detail})") from None
        print(f"[run] resumed {self.dir} at step {state['step']}")
        return state

    def step_done(self, step: int, state):
        """End of step `step`: save a checkpoint when --save-every says so or a stop was asked for (then
        raise Interrupted). `state()` returns the loop state to save with it (plain data and tensors)."""
        stop = self.stop_signal is not None
        if self.accelerator.num_processes > 1:  # all ranks stop at the same step
            stop = bool(
                self.accelerator.reduce(torch.tensor([float(stop)], device=self.accelerator.device), "max").item()
            )
        every = getattr(self.args, "save_every", 0)
        if stop or (every and step % every == 0):
            self.save_checkpoint(step, state())
        if stop:
            self.close()
            raise Interrupted(f"at step {step}, checkpoint saved; continue with --resume {self.dir}")

    def save_checkpoint(self, step: int, state: dict):
        """Write checkpoint/ atomically: `accelerator.save_state` (models, optimizers, scheduler, RNG states of
        every process) and each process's loop state into checkpoint.tmp/, then swap it in by renames, so a
        crash at any moment leaves the previous checkpoint (or checkpoint.old/ during the swap) complete."""
        for model in self.models:  # local shards under ZeRO-3: each process checks its own
            if not all(p.isfinite().all() for p in model.parameters()):
                raise TrainingError(
                    f"non-finite weights at step {step}: checkpoint not written; last good checkpoint: {self.last_checkpoint()}"
                )
        tmp, old = self.dir / "checkpoint.tmp", self.dir / "checkpoint.old"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        for i, acc in enumerate(self.accelerators):
            acc.save_state(str(tmp / f"accelerator_{i}"))
        torch.save({**state, "step": step}, tmp / f"state_{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if self.main:
            (tmp / "meta.json").write_text(json.dumps({"step": step, "processes": self.accelerator.num_processes}))
            if old.exists() and not self.ckpt.exists():  # a crash during the last swap: old/ is the good one
                old.rename(self.ckpt)
            shutil.rmtree(old, ignore_errors=True)
            if self.ckpt.exists():
                self.ckpt.rename(old)
            tmp.rename(self.ckpt)  # from here on the new checkpoint is the one
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def last_checkpoint(self) -> str:
        try:
            step, path = find_checkpoint(self.dir)
            return f"{path} (step {step})"
        except UserError:
            return "none (--save-every N writes them)"

    def check_finite(self, step: int, **values):
        """Stop the run when a loss or reward is NaN or infinite, before it reaches the weights."""
        for name, value in values.items():
            if not torch.isfinite(torch.as_tensor(value)).all():
                raise TrainingError(
                    f"non-finite {name} at step {step}: stopped before the weights changed; last good checkpoint: {self.last_checkpoint()}"
                )

    def close(self):
        self.closed = True
        if self.main:
            self.bar.close()
            self.writer.close()

    def finish(self, final: dict):
        self.accelerator.wait_for_everyone()
        if self.main:
            (self.dir / "eval.json").write_text(json.dumps(final, indent=2))
            self.close()
            print(f"[run] {self.dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
        self.accelerator.end_training()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def find_checkpoint(run_dir: Path) -> tuple[int, Path]:
    """(step, directory) of the run's complete checkpoint: checkpoint/, or checkpoint.old/ when a crash hit
    the swap of a new one in."""
    for d in (run_dir / "checkpoint", run_dir / "checkpoint.old"):
        if d.is_dir():
            try:
                return json.loads((d / "meta.json").read_text())["step"], d
            except (OSError, ValueError, KeyError):
                raise UserError(f"--resume {run_dir}: corrupt checkpoint (no readable {d.name}/meta.json)") from None
    raise UserError(f"--resume {run_dir}: no checkpoint (write them with --save-every N; Ctrl-C writes one)")


def cut_log(path: Path, step: int):
    """Keep the lines of a jsonl log up to `step`: a resumed run writes the later ones again."""
    if path.exists():
        lines = [
            line
            for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step
        ]
        path.write_text("".join(lines))


def epochs(loader, generator: torch.Generator, position=None):
    """The batches of a shuffling DataLoader, epoch after epoch, each with its position: (the state of
    `generator`, its sampler's, at the start of the epoch, the batch's index in the epoch). Given a saved
    position, continue after it with exactly the batches the uninterrupted run would have seen."""
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


def print_samples(samples: list[dict], step: int):
    print(f"\n--- samples at step {step} ---")
    for s in samples:
        scores = "  ".join(f"{k}={v:.3f}" for k, v in s.items() if isinstance(v, float))
        prompt = s["prompt"].replace("\n", "\\n")[-70:]  # real prompts have line breaks (TL;DR, HH, chat templates)
        print(f"{prompt:>70} | {s['completion']!r:<28} {scores}")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    policy,
    tokenizer,
    prompts,
    references,
    *,
    is_toy,
    max_prompt,
    max_new_tokens,
    batch_size=64,
    ref_model=None,
    reward_model=None,
    no_eos_score=-1.0,
):
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
        batch_prompts = [chat_text(tokenizer, p)[0] for p in prompts[i : i + batch_size]]  # messages -> text
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
