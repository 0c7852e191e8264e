"""Shared by the algorithm scripts, and about none of them: processes and devices, loading and saving models,
batched generation, per-token log-probs, reward scores, masked statistics, evaluation. Layout everywhere: `prompt`
[B, P] left-padded, `completion` [B, C] right-padded (tokens up to and including the first EOS), both with the
tokenizer's own pad id; position ids count real tokens only, so padding never changes a logit."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, extract_model_from_parallel, set_seed
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

import data
import judge as judges
import toy
import training
from data import chat_text, pad, retokenize, tokenize_prompts
from training import UserError

transformers.logging.set_verbosity_error()  # stderr stays for our own one-line errors
transformers.logging.disable_progress_bar()


# ---- processes and devices ----


def setup(args) -> Accelerator:
    """The Accelerator: one process on CPU or one GPU; DDP or DeepSpeed ZeRO-2/3 under `accelerate launch` or
    `torchrun`; a seed per process. The precision is accelerate's: `accelerate launch --mixed_precision`, its config
    file or ACCELERATE_MIXED_PRECISION (bf16 works on CPU too), else bf16 autocast on a GPU that has bf16 (weights
    stay fp32) and fp32 elsewhere. `autocast()` applies it to every forward, from sampling to evaluation."""
    training.check_args(args)  # every numeric flag in the range its type declares, before anything uses it
    training.TRUST_REMOTE_CODE = getattr(args, "trust_remote_code", False)  # read by every from_pretrained
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    # without CUDA, cpu=True makes torchrun's ranks one DDP job, but would silently replace DeepSpeed by DDP:
    # DeepSpeed on CPU needs the gloo backend named instead
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    default = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    precision = None if os.environ.get("ACCELERATE_MIXED_PRECISION") else default  # None: accelerate reads it
    accelerator = Accelerator(cpu=not (cuda or deepspeed), mixed_precision=precision, kwargs_handlers=handlers)
    set_seed(args.seed + 100003 * accelerator.process_index)
    n, kind = accelerator.num_processes, {DistributedType.FSDP: "FSDP", DistributedType.NO: "single process"}
    how = f"DeepSpeed ZeRO-{zero_stage()}" if zero_stage() else kind.get(accelerator.distributed_type, "DDP")
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    if accelerator.is_main_process:  # e.g. `[setup] 2 processes, DeepSpeed ZeRO-3, cpu, fp32`
        print(f"[setup] {n} process{'es' * (n > 1)}, {how}, {accelerator.device.type}, {precision}", flush=True)
    return accelerator


def mixed_dtype() -> torch.dtype | None:
    """bf16 or fp16 when the run computes in mixed precision (accelerate's setting), else None."""
    from accelerate.state import AcceleratorState

    precision = AcceleratorState().mixed_precision if AcceleratorState._shared_state else "no"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast():
    """The run's mixed precision around a forward: sampling, scoring, the update and evaluation all run in the same
    numerics (a prepared model's forward is wrapped already; generation, frozen models and a PolicyAndCritic's inner
    policy are not). DeepSpeed casts the weights itself, without autocast."""
    from accelerate.state import PartialState

    if mixed_dtype() is None or zero_stage():
        return contextlib.nullcontext()
    return torch.autocast(PartialState().device.type, dtype=mixed_dtype())


def zero_stage() -> int:
    """The DeepSpeed ZeRO stage of this run (0: no DeepSpeed)."""
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    return 0 if plugin is None else plugin.zero_stage


def prepare(accelerator: Accelerator, *objects, micro_batch_size: int):
    """accelerator.prepare with what DeepSpeed cannot read here: the micro-batch size, and no gradient clipping
    (accelerate's "auto" would clip at 1.0 under DeepSpeed alone). DeepSpeed takes one model per Accelerator."""
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
    """Forward and backward of one micro-batch: gradients sync across processes (a DeepSpeed engine steps) only with
    the last of a minibatch. Weight each loss by the micro-batch's share; optimizer.step() after the last."""
    accelerator.sync_gradients = last
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        yield


# ---- models and tokenizers ----


def load_model(name: str, kind: str = "causal", dtype=torch.float32, tokenizer=None, frozen=False, new_head=None):
    """A causal LM or a 1-label sequence classifier ("reward"; a checkpoint without a head gets a `new_head`, "normal":
    std 1/sqrt(H+1) as N+'s reward model, "zero": a value head that starts at 0; else an error), dropout off;
    `toy` / `toy-long` / `toy-tiny`: a fresh ~1M / ~1M / ~0.1M-parameter Llama. `frozen` (reference, reward model):
    bf16 weights in a bf16 run, eval, no gradients, not sharded. A reward model with its own tokenizer scores
    re-tokenized text."""
    if frozen:
        bf16 = mixed_dtype() == torch.bfloat16
        with whole_weights():
            model = load_model(name, kind, torch.bfloat16 if bf16 else torch.float32, tokenizer)
        return model.eval().requires_grad_(False)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1}
    if name in ("toy-gold", "toy-long-gold") and kind == "reward":  # the gold oracle: the RM's network, its scores
        model = load_model(name.replace("gold", "rm"), kind, dtype)  # replaced by the gold reward in reward_scores()
        model.config.toy_gold, model.config.reward_bias = name.removesuffix("-gold"), 0.0
        with gathered_weights(model.score, modifier_rank=0):  # head at 0: a critic started from it predicts 0, not the
            torch.nn.init.zeros_(model.score.weight)  # RM's scores, which are on another scale than the gold reward
        return model
    if name in ("toy", "toy-tiny", "toy-long"):
        config = toy.model_config("tiny" if name == "toy-tiny" else "small", "toy-long" if "long" in name else "toy")
        with whole_weights():  # built whole as without DeepSpeed (ZeRO-3 then shards rank 0's weights)
            model, missing = cls.from_config(config.__class__(**{**config.to_dict(), **extra})), ["score.weight"]
    else:
        model, info = data.from_pretrained(cls, toy.resolve_model(name), dtype=dtype, output_loading_info=True, **extra)
        missing = info["missing_keys"]
    if kind == "reward" and any(k.startswith("score.") for k in missing):  # a fresh head: N+'s init
        if not new_head:
            raise UserError(
                f"{name} has no score head: it looks like a policy, not a reward model (reward.py makes one)"
            )
        with gathered_weights(model.score, modifier_rank=0):  # ZeRO-3 loads it sharded
            std = 1 / math.sqrt(model.config.hidden_size + 1) if new_head == "normal" else 0.0
            torch.nn.init.normal_(model.score.weight, std=std)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if kind == "reward" and tokenizer is not None:
        own = data.load_tokenizer(name)
        if own.get_vocab() != tokenizer.get_vocab() or own.eos_token_id != tokenizer.eos_token_id:
            print(f"[reward] {name} has its own tokenizer: completions are decoded and re-tokenized for it")
            model.retokenize = (tokenizer, own)
    return model


@contextlib.contextmanager
def whole_weights():
    """Models loaded in the block stay whole: under ZeRO-3 transformers shards every model it loads, but one that
    accelerator.prepare never sees must not be."""
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


def gathered_weights(model, modifier_rank: int | None = None):
    """ZeRO-3's shards of `model` gathered for the block: once per generate(), or to write (`modifier_rank`'s)."""
    if zero_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def trainable(model, args):
    """Training mode (dropout is off: nothing else changes) and, with --gradient-checkpointing, activations
    recomputed in the backward pass (less memory, more compute)."""
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
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(policy, config)


class AdapterDisabled:
    """pi_ref of a LoRA policy: the policy with its adapters off (no second copy of the weights); never trains."""

    def __init__(self, policy):
        object.__setattr__(self, "policy", policy)  # the peft model itself, not a DDP/DeepSpeed wrapper

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy.generate(*args, **kwargs)

    def __getattr__(self, name):  # config, generation_config, training, parameters, eval, train...
        return getattr(self.policy, name)

    def __setattr__(self, name, value):
        setattr(self.policy, name, value)


def reference_model(name: str, policy, lora_r: int, device):
    """The frozen reference pi_ref: the adapter-disabled policy under LoRA, else a frozen copy of `name`."""
    return AdapterDisabled(policy) if lora_r else load_model(name, frozen=True).to(device)


def save_model(accelerator, model, tokenizer, path: Path, part: str | None = None):
    """The trained model, whole, with its tokenizer (on every process: ZeRO-3 gathers); `part`: that submodule only.
    LoRA: saved merged, the adapter alone in path/adapter."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    if part is not None:  # the policy of a PolicyAndCritic
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
    """A saved policy's tokenizer: an added pad gives way to EOS (transformers and vLLM pad prompts with it, masked;
    the vocabulary stays the trained one); the next stage adds its pad again, same id. The configs' pad ids follow."""
    original = getattr(tokenizer, "without_added_pad", None)
    if original is not None or tokenizer.pad_token_id >= model.config.get_text_config().vocab_size:
        tokenizer = copy.deepcopy(original if original is not None else tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.init_kwargs["padding_side"] = "left"  # save_pretrained writes init_kwargs: generation pads left
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def reward_model_outputs(tokenizer, model, state_dict):
    """A saved reward model's (tokenizer, state dict): its pad stays (pooling reads the last non-pad token, the EOS),
    with an embedding row (the mean row) if it had none, and config.pad_token_id; right padding (absolute positions)."""
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


# ---- batches, generation ----


def forward(model, ids: torch.Tensor, pad_id: int, **kwargs):
    """Forward with attention mask and position ids from `ids != pad_id`; pad ids are never embedded."""
    mask = ids != pad_id
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with autocast():
        return model(
            input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(), position_ids=position_ids, **kwargs
        )


def truncate_after_eos(completion: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything after the first EOS becomes padding. Returns (completion, has_eos)."""
    is_eos = completion == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return completion.masked_fill(after_eos, pad_id), is_eos.any(1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, tokenizer, max_new_tokens: int, temperature: float, logits_processor=None):
    """Completions [B, C] of left-padded prompts [B, P] sampled from softmax(logits / temperature) (0: greedy),
    padded after the first EOS. Returns (completion, has_eos)."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    mask = prompt != pad_id
    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=tokenizer.bos_token_id,
        **sample,
        suppress_tokens=[pad_id] if pad_id < model.config.vocab_size else None,
    )
    # unset fields would come from the checkpoint's generation_config.json (repetition_penalty, top_k...):
    # sample from softmax(logits / T) alone, the distribution completion_logprobs scores
    default, model.generation_config, was_training = model.generation_config, GenerationConfig(), model.training
    model.eval()  # gradient checkpointing turns the KV cache off in training mode
    try:
        with gathered_weights(model), autocast():
            out = model.generate(
                input_ids=prompt.masked_fill(~mask, 0),
                attention_mask=mask.long(),
                generation_config=config,
                logits_processor=logits_processor,
            )
    finally:
        model.generation_config = default
        model.train(was_training)
    return truncate_after_eos(out[:, prompt.shape[1] :], eos_id, pad_id)


# ---- log-probs ----


def shared_prompt_forward(model, prompt, completion, pad_id, logits_to_keep=None):
    """The forward of k completions per prompt ([k*B, C] as [all first; all second; ...]) with each prompt run once and
    its KV cache repeated k times: the same computation as k forwards of cat([prompt, completion]). With TL;DR's 512
    prompt and 53 summary tokens, DPO's pair costs ~55% of two forwards (test_shared_prompt_equals_the_prompt_repeated
    checks logits and gradients). Output row r is completion row order[r]. Returns (prompt output, completion output,
    order), or None without a cache to share (no prompt tokens; gradient checkpointing in training mode)."""
    inner = extract_model_from_parallel(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft: the transformers model
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # the name since transformers 5.x
    checkpointing = getattr(inner, "is_gradient_checkpointing", False) if checkpointing is None else checkpointing
    if prompt.shape[1] == 0 or (checkpointing and inner.training):  # checkpointing turns the cache off in training
        return None
    name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"  # by version
    k, mask, comp_mask = completion.shape[0] // prompt.shape[0], prompt != pad_id, completion != pad_id
    keep = lambda n: {} if logits_to_keep is None else {"logits_to_keep": n}  # noqa: E731
    first = forward(model, prompt, pad_id, use_cache=True, **keep(1))
    cache = getattr(first, name, None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(k)  # out of place: gradients flow back into the prompt's forward
    order = torch.arange(completion.shape[0], device=completion.device).view(k, -1).T.reshape(-1)  # by prompt
    completion, comp_mask = completion[order], comp_mask[order]
    full_mask = torch.cat([mask.repeat_interleave(k, 0), comp_mask], 1)  # completions see the real prompt tokens
    position_ids = (full_mask.cumsum(1) - 1).clamp(min=0)[:, prompt.shape[1] :]
    with autocast():
        second = model(
            input_ids=completion.masked_fill(~comp_mask, 0),
            attention_mask=full_mask.long(),
            position_ids=position_ids,
            use_cache=True,
            **{name: cache},
            **keep(logits_to_keep),
        )
    return first, second, order


def completion_logprobs(model, prompt, completion, pad_id, temperature=1.0, with_entropy=False):
    """log pi(y_t | x, y_<t) [B, C] under softmax(logits / temperature), 0 on padding (and each step's entropy).
    k completions per prompt (k*B rows, as in `shared_prompt_forward`) share its forward. An in-vocabulary pad is out of
    the softmax, as generate() never samples it (TRL keeps it: per token the two differ by log(1 - p(pad)))."""
    C, k = completion.shape[1], completion.shape[0] // prompt.shape[0]
    if completion.shape[0] != k * prompt.shape[0] or prompt.shape[1] == 0:
        raise ValueError(
            f"{completion.shape[0]} completions for {prompt.shape[0]} prompts of {prompt.shape[1]} tokens: "
            "not a multiple, or no prompt token"
        )
    # index tensors, not a slice: a slice's backward would allocate a zero gradient the size of all the logits
    keep = lambda start, n: torch.arange(start, start + n, device=completion.device)  # noqa: E731
    shared = shared_prompt_forward(model, prompt, completion, pad_id, keep(0, max(C - 1, 1))) if k > 1 else None
    if shared is not None:  # the logit of y_1 at the last prompt position, of y_t+1 at completion position t
        first, second, order = shared
        parts = [first.logits[:, -1:].repeat_interleave(k, 0)] + ([second.logits] if C > 1 else [])
    else:
        ids = torch.cat([prompt.repeat(k, 1), completion], 1)
        parts = [forward(model, ids, pad_id, logits_to_keep=keep(prompt.shape[1] - 1, C)).logits]
        order = torch.arange(completion.shape[0], device=completion.device)
    ordered, out, t = completion[order], [], 0
    for logits in parts:
        out.append(token_logprobs(logits, ordered[:, t : t + logits.shape[1]], pad_id, temperature, with_entropy))
        t += logits.shape[1]
    back = torch.argsort(order)  # back to the layout of `completion`
    if with_entropy:
        return tuple(torch.cat([o[i] for o in out], 1)[back] for i in range(2))
    return torch.cat(out, 1)[back]


def token_logprobs(logits, completion, pad_id, temperature=1.0, with_entropy=False, chunk_rows=16):
    """log softmax(logits / T)[y_t] [B, C] (fp32, 0 on padding; and entropies) from the logits [B, C, V] that predict
    y. `chunk_rows` rows at a time under activation checkpointing: no fp32 [B, C, V] tensor is kept for the backward
    (0.68 GB for 64 x 53 tokens of a 50k vocabulary). test_token_logprobs_equal_plain_log_softmax checks it."""
    targets = completion.masked_fill(completion == pad_id, 0)
    chunks = [
        checkpoint(_token_logprobs, z, y, temperature, pad_id, with_entropy, use_reentrant=False)
        for z, y in zip(logits.split(chunk_rows), targets.split(chunk_rows))
    ]
    logps, entropy = (torch.cat(c, 0).masked_fill(completion == pad_id, 0.0) for c in zip(*chunks))
    return (logps, entropy) if with_entropy else logps


def _token_logprobs(logits, targets, temperature, pad_id, with_entropy):
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32
    if pad_id < z.shape[-1]:  # generate() never samples an in-vocabulary pad: score that same distribution
        z[..., pad_id] = torch.finfo(z.dtype).min
    logp = F.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else torch.zeros_like(targets, dtype=logp.dtype)
    return logp.gather(-1, targets[..., None]).squeeze(-1), entropy


# ---- reward scores ----


def token_scores(model, prompt: torch.Tensor, completion: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The scalar head's output at every position [k*B, P + C] of a sequence classifier, k completions per prompt
    sharing its forward, read by a hook in the model's own forward (so DDP/DeepSpeed see it; no pooling is used)."""
    inner = extract_model_from_parallel(model)
    captured = []
    hook = inner.score.register_forward_hook(lambda module, args, output: captured.append(output.squeeze(-1)))
    config = inner.config.get_text_config()
    pad_before, k = config.pad_token_id, completion.shape[0] // prompt.shape[0]
    if pad_before is None:  # the model's own pooling (unused here) refuses batches without a pad id
        config.pad_token_id = pad_id
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


def load_reward(args, tokenizer, device):
    """The reward: --reward-fn's Python function, else the frozen --reward-model."""
    if getattr(args, "reward_fn", None):
        return training.load_function(args.reward_fn, "--reward-fn")
    return load_model(args.reward_model, "reward", tokenizer=tokenizer, frozen=True).to(device)


def function_scores(fn, examples: list[dict], completion, tokenizer) -> torch.Tensor:
    """TRL's reward-function call fn(prompts, completions, **columns) on the decoded completions [k*B, C] of the B
    dataset rows `examples`: every other column of a row arrives aligned with each of its k completions."""
    rows = examples * (len(completion) // len(examples))  # completion row r belongs to example r % B
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    chat = [data.is_conversation(r["prompt"]) for r in rows]  # a conversation's completion is a message, as in TRL
    completions = [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)]
    columns = {name: [r[name] for r in rows] for name in rows[0] if name != "prompt"}
    try:
        scores = fn(prompts=[r["prompt"] for r in rows], completions=completions, **columns)
    except ValueError as e:  # a function that refuses its input (the toy's gold reward on another task's prompts)
        raise UserError(f"--reward-fn {fn.__name__}: {e}") from None
    if len(scores) != len(rows) or not all(isinstance(s, (int, float)) for s in scores):
        raise UserError(
            f"--reward-fn {fn.__name__} must return one number per completion ({len(rows)}): {scores!r:.80}"
        )
    return torch.tensor(scores, dtype=torch.float32, device=completion.device)


def reward_scores(reward_model, prompt, completion, pad_id, has_eos=None, no_eos_score=None, examples=None, tok=None):
    """Reward-model score at the EOS (the last real token) minus its bias, or a reward function's score of the
    decoded completions (`examples`: the dataset rows of the prompts, `tok`: the policy's tokenizer); `no_eos_score`
    without EOS (N+: -1). k completions per prompt share its forward. `toy-gold`: the toy task's gold reward."""
    k, model = completion.shape[0] // prompt.shape[0], isinstance(reward_model, torch.nn.Module)
    config = extract_model_from_parallel(reward_model).config if model else None
    if not model:  # --reward-fn
        scores = function_scores(reward_model, examples, completion, tok)
    elif getattr(config, "toy_gold", False):
        if torch.is_grad_enabled():
            raise UserError("--reward-model toy-gold is a fixed oracle (the toy gold reward): it cannot be trained")
        scores = toy.gold_scores(prompt.repeat(k, 1), completion, config.toy_gold).to(completion.device)
    else:
        if getattr(reward_model, "retokenize", None) is not None:
            prompt, completion, pad_id = retokenize(prompt.repeat(k, 1), completion, *reward_model.retokenize)
        scores = token_scores(reward_model, prompt, completion, pad_id)
        last = prompt.shape[1] + (completion != pad_id).sum(1) - 1  # the EOS, or the last token without one
        scores = scores[torch.arange(len(last), device=last.device), last].float() - getattr(config, "reward_bias", 0.0)
    if has_eos is not None and no_eos_score is not None:
        scores = torch.where(has_eos, scores, torch.full_like(scores, no_eos_score))
    return scores


# ---- masked statistics ----


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over mask; a row with no valid entry gives 0, not NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    var, n = masked_mean((x - masked_mean(x, mask)) ** 2, mask), mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ---- evaluation ----


def load_judge(args):
    """--judge (and --judge-model, --judge-template), or None: what `evaluate` measures the win rate with."""
    return judges.load_judge(args.judge, args.judge_model, args.judge_template) if args.judge else None


@torch.no_grad()
def evaluate(policy, tokenizer, test, args, ref_policy=None, reward_model=None, judge=None, batch_size=64):
    """Greedy completions: reward score, length, EOS rate and, with a `judge` and references (the test split's
    `completion`), the win rate against them (judge.win_rate; each sample keeps its reference and judgment); with
    `ref_policy`, KL(pi || pi_ref) = mean of sum_t log pi/pi_ref over samples at temperature 1. toy-long: the title
    and mood rates of the greedy completions and of those samples."""
    was_training = policy.training
    policy.eval()
    pad_id, device = tokenizer.pad_token_id, next(policy.parameters()).device
    prompts, is_long = test["prompt"], args.dataset == "toy-long"
    out, samples, sampled_texts = {"score": [], "length": [], "eos": [], "kl": []}, [], []
    for i in range(0, len(prompts), batch_size):
        texts = [chat_text(tokenizer, p)[0] for p in prompts[i : i + batch_size]]  # messages -> text
        prompt = pad(tokenize_prompts(tokenizer, texts, args.max_prompt_length), pad_id, "left").to(device)
        completion, has_eos = generate(policy, prompt, tokenizer, args.max_new_tokens, temperature=0.0)
        out["length"] += (completion != pad_id).sum(1).tolist()
        out["eos"] += has_eos.float().tolist()
        if reward_model is not None:  # a model, or a reward function of the test rows' columns
            rows = [test[j] for j in range(i, i + len(prompt))]
            scores = reward_scores(
                reward_model, prompt, completion, pad_id, has_eos, args.no_eos_score, rows, tokenizer
            )
            out["score"] += scores.tolist()
        if ref_policy is not None or is_long:  # temperature 1: the KL's estimate, the long tier's skill rates
            sampled, _ = generate(policy, prompt, tokenizer, args.max_new_tokens, temperature=1.0)
            sampled_texts += tokenizer.batch_decode(sampled, skip_special_tokens=True)
        if ref_policy is not None:
            logp = completion_logprobs(policy, prompt, sampled, pad_id).sum(1)
            out["kl"] += (logp - completion_logprobs(ref_policy, prompt, sampled, pad_id).sum(1)).tolist()
        for j, text in enumerate(tokenizer.batch_decode(completion, skip_special_tokens=True)):
            sample = {"prompt": texts[j], "completion": text}
            if out["score"]:
                sample["score"] = out["score"][i + j]
            samples.append(sample)
    policy.train(was_training)
    metrics = {f"eval/{k}": sum(v) / len(v) for k, v in out.items() if v}
    if judge is not None and "completion" in test.column_names:  # the papers' metric: the win rate vs the references
        references = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in test["completion"]]
        completions = [s["completion"] for s in samples]
        try:
            judged, judgments = judges.win_rate(judge, list(test["prompt"]), completions, references, out["eos"])
        except ValueError as e:  # a judge function that refuses the data (toy:gold on another task)
            raise UserError(f"--judge {judge.spec}: {e}") from None
        metrics |= judged
        for sample, j in zip(samples, judgments):
            sample["reference"] = j.pop("reference")
            sample["judgment"] = {k: v for k, v in j.items() if k not in ("prompt", "completion")}
    if is_long:
        metrics |= toy.skill_rates(samples, sampled_texts)
    return metrics, samples
