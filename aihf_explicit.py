"""AIHF with an explicit reward model, from "Learning Reward and Policy Jointly from Demonstration and Preference
Improves Alignment" (Li, Zeng, Liao, Li, Kang, Garcia, Hong 2024, https://arxiv.org/abs/2406.06874; ICLR 2025).

AIHF learns a reward and a policy in one stage from demonstrations (prompt/completion, the SFT data) and preference
pairs (prompt/chosen/rejected). Here they are two networks in alternation, a reward model r_phi and the policy
(aihf.py is the one-network variant, AIHF-DPO). The paper's equations were not available: the losses are this
project's reconstruction, derived in docs/aihf.md, whose labels (A1)-(A18) the code cites.
  - policy phase, every update: one RLOO step (Ahmadian et al. 2024, arXiv 2402.14740; the project's choice), k
    samples per prompt, leave-one-out baseline, reward r_phi(x, y) at EOS - kl_coef * log(pi/pi_ref);
  - reward phase, every --policy-steps updates: --reward-steps steps of r_phi on w_pref * Bradley-Terry(preferences)
    - w_demo * (mean r_phi(y_E) - mean r_phi(y_pi)), y_pi FRESH policy samples; then r_phi is re-centred so the
    demonstrations score 0 on average (the N+ reward bias).

    python aihf_explicit.py                                        # toy task, CPU, ~1 minute
    python aihf_explicit.py --w-demo 0                             # preferences only: SFT -> RM -> RLOO
    accelerate launch --config_file configs/zero2.yaml aihf_explicit.py --model ... --preference-dataset ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import common
import data
import toy
import training
from training import Finite, NonNegative, Positive, Range

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


# The toy tiers' defaults, which any flag given overrides (`--dataset toy-long --help` shows them): the gold reward as
# judge; toy-long's models and lengths
PRESETS = {
    "toy": dict(judge="toy:gold"),
    "toy-long": dict(
        judge="toy:gold",
        model="toy-long-sft",
        reward_model="toy-long-rm",
        preference_dataset="toy-long",
        max_prompt_length=64,
        max_completion_length=32,
        max_new_tokens=48,
    ),
}


@dataclass
class Args:
    # common
    exp_name: str = "aihf_explicit"
    """name of the experiment (prefix of the run directory)"""
    seed: NonNegative[int] = 1
    """random seed"""
    output_dir: str = "runs"
    """parent directory of the run directory"""
    run_name: str | None = None
    """run directory name (default: {exp_name}__{seed}__{unix time})"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf"
    """wandb project name"""
    save_every: NonNegative[int] = 0
    """write a checkpoint to <run>/checkpoint every this many updates (0: only on Ctrl-C / SIGTERM)"""
    resume: str | None = None
    """continue the run in this directory (runs/<run>) from its checkpoint, with its saved arguments"""
    trust_remote_code: bool = False
    """allow Hub models that ship their own Python code (it runs on this machine: trusted models only)"""

    # model
    model: str = "toy-sft"
    """SFT policy to start from; also the frozen reference pi_ref (Hub id or local dir; `toy-sft`: the toy SFT model)"""
    reward_model: str | None = "toy-rm"
    """r_phi starts from it (unless --reward-init); a frozen copy gives the eval score (`toy-rm`: toy dataset only)"""
    reward_init: str | None = None
    """start r_phi from this instead (a causal LM such as `toy-sft` gets a fresh scalar head)"""
    lora_r: NonNegative[int] = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); pi_ref is then the adapter-disabled policy"""
    lora_alpha: Positive[float] = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """demonstrations, prompt/completion (the SFT data): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a file"""
    preference_dataset: str = "toy"
    """preference pairs, prompt/chosen/rejected: `toy`, a Hub id (trl-lib/tldr-preference), save_to_disk dir or file"""
    num_demonstrations: Positive[int] | None = None
    """use only the first N demonstrations (default: all)"""
    num_preferences: Positive[int] | None = None
    """use only the first N preference pairs (default: all); AIHF's claim is about few preferences"""
    max_prompt_length: Positive[int] = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_completion_length: Positive[int] = 16
    """demonstration / chosen / rejected completions (with EOS) longer than this are cut (TL;DR: 53 / 169)"""
    max_new_tokens: Positive[int] = 8
    """length of generated completions (TL;DR: 53)"""
    eval_prompts: Positive[int] = 500
    """test prompts of --dataset used at each evaluation (greedy decoding)"""
    eval_every: NonNegative[int] = 50
    """evaluate every this many updates, before the first and after the last (0: only those)"""
    judge: str | None = None
    """the win rate of greedy completions against the test split's references under this judge: `module:function`,
    a local model, or an OpenAI-compatible URL http://HOST:PORT/v1 (the toy tiers' preset: `toy:gold`, gold reward)"""
    judge_model: str | None = None
    """the model name that an endpoint --judge serves"""
    judge_template: Literal["summary", "chat"] = "summary"
    """an LLM judge's prompt: the DPO paper's TL;DR summary comparison, or its dialogue (HH) comparison"""

    # algorithm
    w_pref: NonNegative[float] = 1.0
    """w_pref: weight of the preference term of r_phi's loss, docs/aihf.md (A13) (paper: not available)"""
    w_demo: NonNegative[float] = 1.0
    """w_demo: weight of the demonstration term of r_phi's loss, 1/beta folded in, docs/aihf.md (A13)"""
    temperature: Positive[float] = 1.0
    """sampling temperature tau_s of the policy's samples, and of their log-probs"""
    kl_coef: NonNegative[float] = 0.05
    """beta_KL of the policy reward s(x, y) - beta_KL * sum_t log(pi/pi_ref), docs/aihf.md (A15) (N+: 0.05)"""
    rloo_k: Range(2)[int] = 4
    """samples per prompt in a policy update (k >= 2, leave-one-out baseline)"""
    no_eos_score: Finite[float] = -1.0
    """score of a completion without EOS in the policy reward and the eval score, in place of the model's (N+: -1)"""
    policy_steps: Positive[int] = 4
    """K_pol, policy updates between two reward phases, docs/aihf.md (A18) (paper: not available)"""
    reward_steps: Positive[int] = 1
    """K_rew, r_phi's steps per reward phase, docs/aihf.md (A18) (paper: not available)"""
    reward_lr: NonNegative[float] = 2e-5
    """AdamW learning rate of r_phi, kept small (the demonstration term is linear, unbounded)"""
    center_demos: Positive[int] = 128
    """demonstrations whose mean score is re-centred to 0 after each reward phase, docs/aihf.md (A14)"""

    # optimization and batch sizes
    lr: NonNegative[float] = 1e-4
    """AdamW learning rate of the policy, decayed linearly to 0"""
    max_steps: Positive[int] = 100
    """updates: one policy optimizer step each (and a reward phase every --policy-steps)"""
    batch_size: Positive[int] = 64
    """preference pairs per reward step, over all processes"""
    demo_batch_size: Positive[int] = 32
    """demonstrations per reward step, each with one fresh policy sample, over all processes"""
    rollout_prompts: Positive[int] = 16
    """prompts per policy update, rloo_k samples each, over all processes"""
    micro_batch_size: Positive[int] | None = None
    """prompts per forward/backward on each process; gradients accumulate up to the whole batches (default: all)"""


class Draws:
    """Endless shuffled draws from `rows`; `drawn` counts them (a checkpoint's data position) and resumes there."""

    def __init__(self, rows: list, seed: int, drawn: int = 0):
        self.rows, self.generator, self.order, self.drawn = rows, torch.Generator().manual_seed(seed), [], 0
        self.take(drawn)

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            if self.drawn % len(self.rows) == 0:
                self.order = torch.randperm(len(self.rows), generator=self.generator).tolist()
            out.append(self.rows[self.order[self.drawn % len(self.rows)]])
            self.drawn += 1
        return out


def load_feedback(args, tokenizer):
    """Token ids of the demonstrations {"text", "prompt", "demo"} and of the preference pairs, and the test split."""
    demos = data.load_data(args.dataset, "train", ("prompt", "completion"))
    prefs = data.load_data(args.preference_dataset, "train", PREFERENCE_COLUMNS)
    demos = demos.select(range(min(args.num_demonstrations or len(demos), len(demos))))
    prefs = prefs.select(range(min(args.num_preferences or len(prefs), len(prefs))))
    test = data.load_data(args.dataset, "test", ("prompt", "completion"))
    test = test.select(range(min(args.eval_prompts, len(test))))
    demo_rows = []
    for p, c in zip(demos["prompt"], demos["completion"]):
        prompt, demo = data.tokenize_pair(tokenizer, p, c, args.max_prompt_length, args.max_completion_length)
        demo_rows.append({"text": p, "prompt": prompt, "demo": demo})
    pref_rows = data.tokenize_pairs(tokenizer, prefs, args.max_prompt_length, args.max_completion_length)
    print(f"[{args.exp_name}] {len(demo_rows)} demonstrations, {len(pref_rows)} preference pairs")
    return demo_rows, pref_rows, test


def collate(rows, first, second, pad_id, device):
    """The rows' prompts left-padded, once for both of their completions [first; second] (chosen/rejected, or
    demonstration/generated), right-padded to one width: each prompt runs once (common.shared_prompt_forward)."""
    prompt = data.pad([r["prompt"] for r in rows], pad_id, "left")
    completion = data.pad([r[first] for r in rows] + [r[second] for r in rows], pad_id, "right")
    return prompt.to(device), completion.to(device)


def gold(tokenizer, rows, completions, has_eos) -> float:
    """Toy task only: the mean gold reward of sampled completions, the smoothest learning curve."""
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return sum(toy.gold_reward(r["text"], t, bool(e)) for r, t, e in zip(rows, texts, has_eos)) / len(rows)


def reward_loss(chosen, rejected, demo, policy, w_pref, w_demo):
    """docs/aihf.md (A13), from r_phi's scores: preference pairs (chosen, rejected) and demonstrations against fresh
    policy samples on the same prompts (demo, policy; None when w_demo = 0)."""
    loss, stats = 0.0, {"w_pref": w_pref, "w_demo": w_demo}
    if w_pref:
        bt = -F.logsigmoid(chosen.float() - rejected.float()).mean()  # Bradley-Terry NLL, as reward.py
        loss = loss + w_pref * bt  # docs/aihf.md (A13), first term: w_pref * mean_P[-log s(r(y_w) - r(y_l))]
        stats.update({"rm/bt_loss": bt.detach(), "rm/accuracy": (chosen > rejected).float().mean()})
        stats["loss/pref"] = bt.detach()
    if w_demo:
        demo_gap = demo.float().mean() - policy.float().mean()
        loss = loss - w_demo * demo_gap  # docs/aihf.md (A13), second term: - w_demo * (mean_D r(y_E) - mean r(y_pi))
        stats.update({"rm/demo_gap": demo_gap.detach(), "loss/demo": -demo_gap.detach()})
    return loss, stats


def sample(policy, tokenizer, rows, k, args):
    """k samples y ~ pi_theta at tau_s of each row's prompt, [all first; all second; ...], cut after EOS, and has_eos;
    with the prompts, each once (common.completion_logprobs shares a prompt's forward with its k samples)."""
    prompt = data.pad([r["prompt"] for r in rows], tokenizer.pad_token_id, "left").to(policy.device)
    return prompt, *common.generate(policy, prompt.repeat(k, 1), tokenizer, args.max_new_tokens, args.temperature)


def reward_phase_loss(reward_model, rows, pref: bool, args, pad_id, device):
    """docs/aihf.md (A13) on a micro-batch of one source: preference pairs (`pref`), or demonstrations against fresh
    policy samples "gen", drawn for the whole batch (only when w_demo > 0: with w_demo = 0 none reaches r_phi)."""
    first, second = ("chosen", "rejected") if pref else ("demo", "gen")
    a, b = common.reward_scores(reward_model, *collate(rows, first, second, pad_id, device), pad_id).chunk(2)
    return reward_loss(a, b, None, None, args.w_pref, 0.0) if pref else reward_loss(None, None, a, b, 0.0, args.w_demo)


@torch.no_grad()
def recentre(r_phi, center, pad_id, device):
    """docs/aihf.md (A14): shift r_phi's bias so the `center` demonstrations score 0 on average; the missing-EOS
    score keeps its place relative to the demonstrations' scores while r_phi moves."""
    scores = common.reward_scores(r_phi, *collate(center, "demo", "demo", pad_id, device), pad_id)
    r_phi.config.reward_bias = getattr(r_phi.config, "reward_bias", 0.0) + scores.mean().item()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[k, n] rewards (sample j of prompt i at [j, i]) -> r minus the mean of the other k-1 samples."""
    k = rewards.shape[0]
    return rewards - (rewards.sum(0, keepdim=True) - rewards) / (k - 1)  # docs/aihf.md (A16), RLOO


def prepare_reward_model(args, tokenizer, pairs_per_step):
    """r_phi, trained, from --reward-init, else --reward-model, with its AdamW, prepared by an Accelerator of its own
    (DeepSpeed trains one model per Accelerator; same processes). It must read the policy's tokens."""
    name = args.reward_init or args.reward_model
    new_head = "normal" if args.reward_init else None  # --reward-init: a causal LM gets a fresh head on purpose
    reward_model = common.trainable(common.load_model(name, "reward", tokenizer=tokenizer, new_head=new_head), args)
    if getattr(reward_model, "retokenize", None) is not None:
        raise training.UserError(f"{name} has its own tokenizer: r_phi is trained on the policy's tokens, use its own")
    reward_optimizer = torch.optim.AdamW(reward_model.parameters(), lr=args.reward_lr, eps=1e-5)
    reward_accelerator = Accelerator()
    prepared = common.prepare(reward_accelerator, reward_model, reward_optimizer, micro_batch_size=2 * pairs_per_step)
    return reward_accelerator, *prepared


def check_args(args, eval_reward_model):
    if (args.reward_init or eval_reward_model) is None:
        raise training.UserError("--reward-model or --reward-init is needed: the starting point of r_phi")
    if not (args.w_pref or args.w_demo):
        raise training.UserError("--w-pref and --w-demo are both 0: nothing to learn from")


def evaluate(run, update, policy, tokenizer, test, args, ref_policy, reward_model, judge):
    return run.log_eval(update, *common.evaluate(policy, tokenizer, test, args, ref_policy, reward_model, judge))


def main(args: Args):
    # the frozen eval scorer; the toy reward model fits the toy task only
    scorer_name = (
        args.reward_model if args.dataset in toy.TIERS or args.reward_model not in ("toy-rm", "toy-long-rm") else None
    )
    check_args(args, scorer_name)
    accelerator = common.setup(args)
    device, n_proc, total = accelerator.device, accelerator.num_processes, args.max_steps
    per_pref, per_demo = args.batch_size // n_proc, args.demo_batch_size // n_proc
    per_prompts = args.rollout_prompts // n_proc
    if min(per_pref, per_demo, per_prompts) == 0:
        raise training.UserError(f"batch sizes and --rollout-prompts must be >= the {n_proc} process(es)")
    tokenizer = data.load_tokenizer(args.model)
    judge = common.load_judge(args)  # the evaluations' win rate against the test references
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    eval_reward_model = None
    if scorer_name is not None:
        eval_reward_model = common.load_model(scorer_name, "reward", tokenizer=tokenizer, frozen=True).to(device)
    demo_rows, pref_rows, test = load_feedback(args, tokenizer)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / total)  # linear to 0
    # prompts per forward/backward: with their rloo_k samples in a policy update, their pair in a reward step
    micro_pol, micro_rew = (min(args.micro_batch_size or n, n) for n in (per_prompts, max(per_pref, per_demo)))
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=args.rloo_k * micro_pol)
    reward_accelerator, reward_model, reward_optimizer = prepare_reward_model(args, tokenizer, micro_rew)
    unwrapped, r_phi = accelerator.unwrap_model(policy), reward_accelerator.unwrap_model(reward_model)
    run = training.Run(args, accelerator, total)
    state = run.resume(reward_accelerator, scheduler=scheduler)
    if state is None:
        state = {"step": 0, "drawn": {"demos": 0, "prefs": 0}, "reward_bias": None}
        state["initial"] = evaluate(run, 0, unwrapped, tokenizer, test, args, ref_policy, eval_reward_model, judge)
    elif state["reward_bias"] is not None:  # r_phi's bias is a config entry, not a weight: the checkpoint keeps it
        r_phi.config.reward_bias = state["reward_bias"]
    initial = state["initial"]
    rank_seed = args.seed + 100003 * accelerator.process_index  # independent shuffles of the two sources
    demos = Draws(demo_rows, rank_seed, state["drawn"]["demos"])
    prefs = Draws(pref_rows, rank_seed + 1, state["drawn"]["prefs"])
    times = {}
    for update in range(state["step"] + 1, total + 1):
        times = {}
        # 1. policy phase, docs/aihf.md (A15): k samples y_1..y_k ~ pi_theta at tau_s of each of the update's prompts
        with training.timer(times, "time/generation"), torch.no_grad():
            rows = demos.take(per_prompts)
            unique, completion, has_eos = sample(unwrapped, tokenizer, rows, args.rloo_k, args)
        # 2. score: s(x, y) of r_phi at EOS (--no-eos-score without), and log pi_ref(y|x) at tau_s
        with training.timer(times, "time/scoring"), torch.no_grad():
            ref_logps = common.completion_logprobs(ref_policy, unique, completion, pad_id, args.temperature).sum(1)
            scores = common.reward_scores(r_phi, unique, completion, pad_id, has_eos, args.no_eos_score)
            run.check_finite(update, reward=scores)
        # 3. one RLOO step, docs/aihf.md (A15)-(A17), in micro-batches of whole prompts: a baseline is a prompt's own
        xs, parts = torch.arange(len(rows), device=device).split(micro_pol), []
        for i, x in enumerate(xs):  # prompts x and their k samples y: sample j of prompt i at row j * n + i
            y = (x + len(rows) * torch.arange(args.rloo_k, device=device)[:, None]).flatten()
            with training.timer(times, "time/update"), common.accumulate(accelerator, policy, last=i == len(xs) - 1):
                logps = common.completion_logprobs(policy, unique[x], completion[y], pad_id, args.temperature).sum(1)
                kl = logps.detach() - ref_logps[y]  # on-policy: log pi_theta is also the sampler's log-prob
                rewards = scores[y] - args.kl_coef * kl  # docs/aihf.md (A15): R = s(x, y) - beta_KL * log(pi/pi_ref)
                advantages = rloo_advantages(rewards.view(args.rloo_k, -1)).flatten()  # docs/aihf.md (A16)
                policy_loss = -(advantages * logps).mean()  # docs/aihf.md (A17): REINFORCE, leave-one-out baseline
                run.check_finite(update, loss=policy_loss)
                accelerator.backward(policy_loss * len(x) / len(rows))  # the mean over all the update's samples
            parts.append((logps.detach(), kl, rewards, policy_loss.detach().expand(len(y))))  # loss per sample
        with training.timer(times, "time/update"):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        logps, kl, rewards, policy_loss = (torch.cat(x) for x in zip(*parts))
        metrics = {"objective/scores": scores.mean(), "objective/kl": kl.mean(), "loss/policy": policy_loss.mean()}
        metrics.update({"objective/rlhf_reward": rewards.mean(), "objective/entropy": -logps.detach().mean()})
        length = (completion != pad_id).sum(1).float().mean()
        metrics.update({"objective/eos_rate": has_eos.float().mean(), "objective/length": length})
        if args.dataset in toy.TIERS:
            metrics["objective/gold"] = gold(tokenizer, rows * args.rloo_k, completion, has_eos)
        # 4. reward phase every K_pol updates, docs/aihf.md (A18): K_rew steps on (A13), then the re-centring (A14)
        if update % args.policy_steps == 0:
            with training.timer(times, "time/reward"):
                for _ in range(args.reward_steps):
                    pairs, rows = prefs.take(per_pref * bool(args.w_pref)), demos.take(per_demo * bool(args.w_demo))
                    if args.w_demo:  # FRESH samples y_pi for the same prompts, all before the first micro-batch
                        fresh = sample(unwrapped, tokenizer, rows, 1, args)[1].cpu()
                        rows = [dict(r, gen=c[c != pad_id].tolist()) for r, c in zip(rows, fresh)]
                    jobs, stats = [(b, i) for b in (pairs, rows) for i in range(0, len(b), micro_rew)], {}
                    for n, (b, i) in enumerate(jobs):  # micro-batches of one source each
                        mb, share = b[i : i + micro_rew], min(micro_rew, len(b) - i) / len(b)
                        with common.accumulate(reward_accelerator, reward_model, last=n == len(jobs) - 1):
                            loss, part = reward_phase_loss(reward_model, mb, b is pairs, args, pad_id, device)
                            run.check_finite(update, reward_loss=loss)
                            reward_accelerator.backward(loss * share)  # a source's mean over its whole batch, (A13)
                        stats.update({k: stats.get(k, 0.0) + v * share for k, v in part.items()})
                    reward_optimizer.step()
                    reward_optimizer.zero_grad()
                    metrics.update({**stats, "w_pref": args.w_pref, "w_demo": args.w_demo})
                recentre(r_phi, demo_rows[: args.center_demos], pad_id, device)
            metrics["rm/bias"] = r_phi.config.reward_bias
        metrics.update({"lr": scheduler.get_last_lr()[0], **times})
        metrics["time/samples_per_second"] = len(completion) / sum(times.values())
        run.log(metrics, update, show=("objective/scores", "objective/kl"))
        if args.eval_every and update % args.eval_every == 0 and update < total:
            evaluate(run, update, unwrapped, tokenizer, test, args, ref_policy, eval_reward_model, judge)
        drawn = {"demos": demos.drawn, "prefs": prefs.drawn}
        bias = getattr(r_phi.config, "reward_bias", None)
        run.step_done(update, {"initial": initial, "drawn": drawn, "reward_bias": bias})

    final = evaluate(run, total, unwrapped, tokenizer, test, args, ref_policy, eval_reward_model, judge)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    common.save_model(reward_accelerator, reward_model, tokenizer, run.dir / "reward_model")
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
