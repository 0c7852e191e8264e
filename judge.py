"""The papers' metric: the WIN RATE of a policy's completions against reference completions under a judge.

A judge is one of
- a Python function `module:function` (or `path/file.py:function`): pointwise, TRL's reward-function call
  `fn(prompts=..., completions=..., **columns) -> list[float]` (higher is better), or pairwise,
  `fn(prompts, completions_a, completions_b) -> list[float | None]` (1: a is better, 0: b is, 0.5 or None: a tie);
- an OpenAI-compatible endpoint `http(s)://.../v1` with `--judge-model` (standard library only);
- a local causal LM (a directory or Hub id), run in-process with greedy decoding.
LLM judges answer the DPO paper's comparison prompts and see every pair in both orders.

    python judge.py RUN_DIR --judge SPEC [--judge-model NAME] [--judge-template summary|chat] [--step N]

judges the samples of a finished run (RUN_DIR/samples.jsonl, last evaluation) and writes RUN_DIR/judgments.jsonl and
RUN_DIR/judge.json. docs/judges.md has the details."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import tyro

import training
from training import NonNegative, Positive, UserError

# The comparison prompts of Rafailov et al. 2023, "Direct Preference Optimization", Appendix C.2, behind its GPT-4 win
# rates: the summarization prompt ("concise", used for TL;DR) and the single-turn dialogue (Anthropic HH) prompt.
SUMMARY_PROMPT = """Which of the following summaries does a better job of summarizing the most important points in \
the given forum post, without including unimportant or irrelevant details? A good summary is both precise and concise.

Post:
{prompt}

Summary A:
{a}

Summary B:
{b}

FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new \
line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""

CHAT_PROMPT = """For the following query to a chatbot, which response is more helpful?

Query: {prompt}

Response A:
{a}

Response B:
{b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. SECOND, on \
a new line, state only "A" or "B" to indicate which response is more helpful. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">"""

TEMPLATES = {"summary": (SUMMARY_PROMPT, "Preferred"), "chat": (CHAT_PROMPT, "More helpful")}  # prompt, verdict key


@dataclasses.dataclass
class Judge:
    """A loaded judge. kind: "pointwise" / "pairwise" (call is the function) or "endpoint" / "local" (call asks
    the LLM one prompt text and returns its answer)."""

    spec: str
    kind: str
    call: Callable
    template: str | None = None
    model: str | None = None


def load_judge(
    spec: str,
    judge_model: str | None = None,
    template: str = "summary",
    *,
    max_new_tokens: int = 256,
    timeout: float = 120.0,
) -> Judge:
    """The judge that `spec` names: `module:function`, an `http(s)://.../v1` endpoint (`judge_model` names the
    model) or a local causal LM. `template` ("summary" / "chat") and `max_new_tokens` apply to LLM judges;
    `timeout` (seconds) to each request to an endpoint. Mistakes in the spec raise UserError."""
    if template not in TEMPLATES:
        raise UserError(f"--judge-template {template}: one of {', '.join(TEMPLATES)}")
    if spec.startswith(("http://", "https://")):
        if not judge_model:
            raise UserError(f"--judge {spec}: an endpoint needs --judge-model (the model name its server expects)")
        ask = endpoint_client(spec, judge_model, max_new_tokens, timeout)
        return Judge(spec, "endpoint", ask, template, judge_model)
    module, _, name = spec.rpartition(":")
    if module and name.isidentifier() and not os.path.isdir(spec):  # a directory name may hold a colon
        fn = training.load_function(spec, "--judge")
        return Judge(spec, function_kind(fn, spec), fn)
    return Judge(spec, "local", local_model(spec, max_new_tokens), template, spec)


def function_kind(fn: Callable, spec: str) -> str:
    """Pointwise or pairwise, by the signature: a **kwargs parameter makes a function pointwise (TRL's reward
    functions take the dataset's other columns that way); else exactly three positional parameters make it
    pairwise; else it is pointwise if it can be called TRL's way, fn(prompts=..., completions=...)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        raise UserError(f"--judge {spec}: cannot read the function's signature") from None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return "pointwise"
    if sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) == 3 and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
    ):
        return "pairwise"
    try:
        inspect.signature(fn).bind(prompts=[], completions=[])
    except TypeError:
        raise UserError(
            f"--judge {spec}: a judge function is fn(prompts, completions, **columns) -> scores or "
            f"fn(prompts, completions_a, completions_b) -> verdicts"
        ) from None
    return "pointwise"


def endpoint_client(base_url: str, model: str, max_new_tokens: int, timeout: float) -> Callable[[str], str]:
    """ask(text) -> answer through an OpenAI-compatible chat-completions endpoint (temperature 0, OPENAI_API_KEY as
    the bearer token when set). The server is reached once here, so an unreachable one fails before any judging."""
    base_url = base_url.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"

    def request(path: str, body: dict | None = None, probe: bool = False) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:  # the server's reason (wrong model name, prompt too long, bad key)
            if probe and e.code not in (401, 403):  # it answers; without GET /models it may still serve chats
                return {}
            detail = " ".join(e.read().decode(errors="replace").split())[:300]
            hint = " (an OpenAI-compatible base URL ends in /v1)" if e.code == 404 else ""
            raise UserError(f"--judge {base_url}{path}: HTTP {e.code} {detail}{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:  # refused, DNS, timeout, not JSON
            reason = getattr(e, "reason", None) or e
            raise UserError(f"--judge {base_url}: no OpenAI-compatible server answers there ({reason})") from None

    request("/models", probe=True)

    def ask(text: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": max_new_tokens,
        }
        reply = request("/chat/completions", body)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"--judge {base_url}: not a chat-completions answer: {json.dumps(reply)[:200]}") from None

    return ask


def local_model(name: str, max_new_tokens: int) -> Callable[[str], str]:
    """ask(text) -> answer from a causal LM loaded here (GPU if there is one), greedy, the text as one user message
    of the tokenizer's chat template when it has one, else as it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        kwargs = dict(trust_remote_code=training.TRUST_REMOTE_CODE)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs).to(device).eval()
    except (OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"--judge {name}: cannot load a causal LM ({detail}); a judge is module:function, an http(s):// "
            f"endpoint, a model directory or a Hub id"
        ) from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def ask(text: str) -> str:
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": text}]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            inputs = tokenizer(text, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return ask


def parse_verdict(response: str, key: str = "Preferred") -> str | None:
    """ "A", "B" or None (a tie) from an LLM judge's answer: the last line `<key>: A` / `<key>: B`, whatever the case,
    spacing, quotes, brackets or markdown around it (`**Preferred:** "b"`, `More helpful: Response A`). An answer
    that names neither, or something else after the letter, is None: the prompt asks for the letter alone."""
    words = r"\s+".join(map(re.escape, key.split()))
    decor = r"[\s*_\"'`“”‘’<>\[\]()]*"  # around the letter: markdown, quotes, brackets
    pattern = rf"^[\s*_#>-]*{words}[\s*_]*:{decor}(?:summary\s+|response\s+)?([AB]){decor}\.?\s*$"
    found = re.findall(pattern, response, flags=re.IGNORECASE | re.MULTILINE)
    return found[-1].upper() if found else None


def prompt_text(prompt) -> str:
    """A prompt as text for the judge's prompt: a string as it is, a conversation as `role: content` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return str(prompt).strip()


def win_rate(judge: Judge, prompts: list, completions: list, references: list, has_eos=None) -> tuple[dict, list]:
    """(metrics, judgments): eval/win_rate, the mean over prompts of the policy's outcome against the reference
    (1 win, 0.5 tie, 0 loss; for LLM judges the mean over both orders); eval/judge_ties, the share of verdicts that
    were ties (or named neither choice); for pointwise judges eval/judge_score and eval/judge_score_reference. One
    judgment per prompt. `has_eos` (whether each completion ended) reaches a pointwise function that takes it."""
    if not len(prompts) == len(completions) == len(references) > 0:
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(references)} references")
    n = len(prompts)
    judgments = [dict(prompt=p, completion=c, reference=r) for p, c, r in zip(prompts, completions, references)]
    metrics = {}
    if judge.kind == "pointwise":  # one call: the policy's completions, then the references
        takes = inspect.signature(judge.call).parameters.values()
        knows_eos = has_eos is not None and any(p.name == "has_eos" or p.kind is p.VAR_KEYWORD for p in takes)
        extra = {"has_eos": [bool(e) for e in has_eos] + [True] * n} if knows_eos else {}  # the references end
        scores = judge.call(prompts=list(prompts) * 2, completions=list(completions) + list(references), **extra)
        scores = check_numbers(judge, scores, 2 * n, "scores")
        for j, s, t in zip(judgments, scores[:n], scores[n:]):
            j.update(score=s, score_reference=t, outcome=1.0 if s > t else 0.5 if s == t else 0.0)
        ties = sum(j["outcome"] == 0.5 for j in judgments)
        metrics["eval/judge_score"] = sum(scores[:n]) / n
        metrics["eval/judge_score_reference"] = sum(scores[n:]) / n
    elif judge.kind == "pairwise":  # one call, the policy's completions as a
        verdicts = judge.call(list(prompts), list(completions), list(references))
        verdicts = check_numbers(judge, verdicts, n, "verdicts", pairwise=True)
        for j, v in zip(judgments, verdicts):
            j.update(verdict=v, outcome=0.5 if v is None else v)
        ties = sum(v is None or v == 0.5 for v in verdicts)
    else:
        ties = 0
        for j in progress(judgments, judge.spec):
            j.update(ask_both_orders(judge, j["prompt"], j["completion"], j["reference"]))
            ties += [j["choice_policy_first"], j["choice_reference_first"]].count(None)
        ties /= 2  # two verdicts a prompt
    metrics = {
        "eval/win_rate": sum(j["outcome"] for j in judgments) / n,
        "eval/judge_ties": ties / n,
        **metrics,
    }
    return metrics, judgments


def ask_both_orders(judge: Judge, prompt, completion: str, reference: str) -> dict:
    """Both answers, both parsed choices and the outcome of one pair: asked with the policy's completion as A, then
    as B, so that a judge's preference for a position cancels out (a choice of None counts half)."""
    template, key = TEMPLATES[judge.template]
    text = prompt_text(prompt)
    first = judge.call(template.format(prompt=text, a=completion.strip(), b=reference.strip()))
    second = judge.call(template.format(prompt=text, a=reference.strip(), b=completion.strip()))
    choices = parse_verdict(first, key), parse_verdict(second, key)
    won = {"A": 1.0, "B": 0.0, None: 0.5}[choices[0]] + {"A": 0.0, "B": 1.0, None: 0.5}[choices[1]]
    return dict(
        response_policy_first=first,
        response_reference_first=second,
        choice_policy_first=choices[0],
        choice_reference_first=choices[1],
        outcome=won / 2,
    )


def check_numbers(judge: Judge, values, n: int, what: str, pairwise: bool = False) -> list:
    """The n numbers a judge function returned, as floats: finite scores, or verdicts in [0, 1] or None
    (`pairwise`). Anything else is a one-line UserError."""
    number = lambda v: isinstance(v, numbers.Real) and math.isfinite(v) and (not pairwise or 0 <= v <= 1)
    try:
        values = list(values)
    except TypeError:
        values = None
    if values is None or len(values) != n or not all(number(v) or (pairwise and v is None) for v in values):
        wanted = "a number in [0, 1] or None" if pairwise else "a finite number"
        raise UserError(f"--judge {judge.spec} must return a list of {n} {what}, each {wanted}")
    return [None if v is None else float(v) for v in values]


def progress(items: list, desc: str):
    """A progress bar over LLM calls on a terminal; nothing in logs."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"judge {desc}", disable=None, file=sys.stdout)


# ---- the command line: judge a finished run's samples ----


@dataclasses.dataclass
class Args:
    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """a run directory (runs/<run>) holding samples.jsonl"""
    judge: str
    """`module:function` / `path/file.py:function` (a Python judge), `http(s)://HOST/v1` (an OpenAI-compatible
    endpoint, with --judge-model) or a local causal LM (directory or Hub id)"""
    judge_model: str | None = None
    """the model name an endpoint expects (e.g. gpt-4o; `transformers serve DIR`: DIR as given)"""
    judge_template: Literal["summary", "chat"] = "summary"
    """LLM judges' prompt: the DPO paper's TL;DR summary comparison or its single-turn dialogue (HH) comparison"""
    step: NonNegative[int] | None = None
    """judge the samples of this evaluation step (default: the last one)"""
    max_new_tokens: Positive[int] = 256
    """the longest answer an LLM judge may give, in tokens"""


def read_samples(run_dir: Path, step: int | None) -> tuple[int, list[dict]]:
    """(step, rows) of RUN_DIR/samples.jsonl at `step` (default: the last), each with a reference."""
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no samples.jsonl (not a run directory, or a run that never evaluated)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path}: line {i} is not valid JSON") from None
    steps = sorted({r.get("step") for r in rows if isinstance(r.get("step"), int)})
    if not steps:
        raise UserError(f"{path}: no samples with a step")
    if step is not None and step not in steps:
        raise UserError(f"--step {step}: {path} has samples at steps {', '.join(map(str, steps))}")
    step = steps[-1] if step is None else step
    rows = [r for r in rows if r.get("step") == step]
    if any("reference" not in r for r in rows):
        raise UserError(f"{path}: the samples of step {step} have no `reference` to judge against")
    return step, rows


def main(args: Args):
    """Judge RUN_DIR's samples: judgments.jsonl, judge.json and the win rate printed."""
    training.check_args(args)
    run_dir = Path(args.run_dir)
    step, rows = read_samples(run_dir, args.step)
    judge = load_judge(args.judge, args.judge_model, args.judge_template, max_new_tokens=args.max_new_tokens)
    metrics, judgments = win_rate(judge, *([r[k] for r in rows] for k in ("prompt", "completion", "reference")))
    with open(run_dir / "judgments.jsonl", "w") as f:
        f.writelines(json.dumps({"step": step, **j}) + "\n" for j in judgments)
    llm = judge.kind in ("endpoint", "local")
    summary = {
        **metrics,
        "step": step,
        "samples": len(rows),
        "judge": judge.spec,
        "judge_kind": judge.kind,
        "template": judge.template if llm else None,
        "judge_model": judge.model,
    }
    (run_dir / "judge.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[judge] {run_dir} step {step}: win rate {metrics['eval/win_rate']:.4f} over {len(rows)} prompts "
        f"({metrics['eval/judge_ties']:.1%} ties) under {judge.spec}"
    )
    return summary


if __name__ == "__main__":
    training.run_cli(Args, main)
