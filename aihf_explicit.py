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

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import common
import data
import toy
import training

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class Args:
    # common
    exp_name: str = "aihf_explicit"
    """name of the experiment (prefix of the run directory)"""
    seed: int = 1
    """random seed"""
    output_dir: str = "runs"
    """parent directory of the run directory"""
    run_name: str | None = None
    """run directory name (default: {exp_name}__{seed}__{unix time})"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf"
    """wandb project name"""
    save_every: int = 0
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
    lora_r: int = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); pi_ref is then the adapter-disabled policy"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """demonstrations, prompt/completion (the SFT data): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a file"""
    preference_dataset: str = "toy"
    """preference pairs, prompt/chosen/rejected: `toy`, a Hub id (trl-lib/tldr-preference), save_to_disk dir or file"""
    num_demonstrations: int | None = None
    """use only the first N demonstrations (default: all)"""
    num_preferences: int | None = None
    """use only the first N preference pairs (default: all); AIHF's claim is about few preferences"""
    max_prompt_length: int = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_completion_length: int = 16
    """demonstration / chosen / rejected completions (with EOS) longer than this are cut (TL;DR: 53 / 169)"""
    max_new_tokens: int = 8
    """length of generated completions (TL;DR: 53)"""
    eval_prompts: int = 500
    """test prompts of --dataset used at each evaluation (greedy decoding)"""
    eval_every: int = 50
    """evaluate every this many updates (and before the first and after the last)"""

    # algorithm
    w_pref: float = 1.0
    """w_pref: weight of the preference term of r_phi's loss, docs/aihf.md (A13) (paper: not available)"""
    w_demo: float = 1.0
    """w_demo: weight of the demonstration term of r_phi's loss, 1/beta folded in, docs/aihf.md (A13)"""
    temperature: float = 1.0
    """sampling temperature tau_s of the policy's samples, and of their log-probs"""
    kl_coef: float = 0.05
    """beta_KL of the policy reward s(x, y) - beta_KL * sum_t log(pi/pi_ref), docs/aihf.md (A15) (N+: 0.05)"""
    rloo_k: int = 4
    """samples per prompt in a policy update (k >= 2, leave-one-out baseline)"""
    no_eos_score: float = -1.0
    """score of a completion without EOS in the policy reward and the eval score, in place of the model's (N+: -1)"""
    policy_steps: int = 4
    """K_pol, policy updates between two reward phases, docs/aihf.md (A18) (paper: not available)"""
    reward_steps: int = 1
    """K_rew, r_phi's steps per reward phase, docs/aihf.md (A18) (paper: not available)"""
    reward_lr: float = 2e-5
    """AdamW learning rate of r_phi, kept small (the demonstration term is linear, unbounded)"""
    center_demos: int = 128
    """demonstrations whose mean score is re-centred to 0 after each reward phase, docs/aihf.md (A14)"""

    # optimization and batch sizes
    lr: float = 1e-4
    """AdamW learning rate of the policy, decayed linearly to 0"""
    max_steps: int = 100
    """updates: one policy optimizer step each (and a reward phase every --policy-steps)"""
    batch_size: int = 64
    """preference pairs per reward step, over all processes"""
    demo_batch_size: int = 32
    """demonstrations per reward step, each with one fresh policy sample, over all processes"""
    rollout_prompts: int = 16
    """prompts per policy update, rloo_k samples each, over all processes"""


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


def reward_phase_loss(reward_model, policy, tokenizer, pairs, rows, args):
    """docs/aihf.md (A13) on a preference batch and on demonstrations against FRESH samples of the policy for the same
    prompts (drawn only when w_demo > 0: with w_demo = 0 no policy sample reaches r_phi)."""
    chosen = rejected = demo = fresh = None
    pad_id, device = tokenizer.pad_token_id, policy.device
    if args.w_pref:
        batch = collate(pairs, "chosen", "rejected", pad_id, device)
        chosen, rejected = common.reward_scores(reward_model, *batch, pad_id).chunk(2)
    if args.w_demo:
        prompt = data.pad([r["prompt"] for r in rows], pad_id, "left").to(device)
        completion, _ = common.generate(policy, prompt, tokenizer, args.max_new_tokens, args.temperature)
        rows = [dict(r, gen=c[c != pad_id].tolist()) for r, c in zip(rows, completion.cpu())]
        batch = collate(rows, "demo", "gen", pad_id, device)
        demo, fresh = common.reward_scores(reward_model, *batch, pad_id).chunk(2)
    return reward_loss(chosen, rejected, demo, fresh, args.w_pref, args.w_demo)


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
    reward_model = common.trainable(common.load_model(name, "reward", tokenizer=tokenizer), args)
    if getattr(reward_model, "retokenize", None) is not None:
        raise training.UserError(f"{name} has its own tokenizer: r_phi is trained on the policy's tokens, use its own")
    reward_optimizer = torch.optim.AdamW(reward_model.parameters(), lr=args.reward_lr, eps=1e-5)
    reward_accelerator = Accelerator()
    prepared = common.prepare(reward_accelerator, reward_model, reward_optimizer, micro_batch_size=2 * pairs_per_step)
    return reward_accelerator, *prepared


def check_args(args, eval_reward_model):
    if args.rloo_k < 2 or min(args.policy_steps, args.reward_steps) < 1:
        raise training.UserError("--rloo-k must be >= 2, --policy-steps and --reward-steps >= 1")
    if (args.reward_init or eval_reward_model) is None:
        raise training.UserError("--reward-model or --reward-init is needed: the starting point of r_phi")
    if not (args.w_pref or args.w_demo):
        raise training.UserError("--w-pref and --w-demo are both 0: nothing to learn from")
    positive = ("temperature", "max_steps", "max_prompt_length", "max_completion_length", "max_new_tokens")
    positive += ("num_demonstrations", "num_preferences")
    non_negative = ("lr", "w_pref", "w_demo", "kl_coef", "reward_lr", "center_demos", "save_every")
    training.check_ranges(args, positive, non_negative)


def evaluate(run, update, policy, tokenizer, test, args, ref_policy, reward_model):
    return run.log_eval(update, *common.evaluate(policy, tokenizer, test, args, ref_policy, reward_model))


def main(args: Args):
    args = toy.tier_args(args)  # --dataset toy-long: the tier's models and lengths
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
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    eval_reward_model = None
    if scorer_name is not None:
        eval_reward_model = common.load_model(scorer_name, "reward", tokenizer=tokenizer, frozen=True).to(device)
    demo_rows, pref_rows, test = load_feedback(args, tokenizer)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / total)  # linear to 0
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=2 * max(per_pref, per_demo))
    reward_accelerator, reward_model, reward_optimizer = prepare_reward_model(args, tokenizer, max(per_pref, per_demo))
    unwrapped, r_phi = accelerator.unwrap_model(policy), reward_accelerator.unwrap_model(reward_model)
    run = training.Run(args, accelerator, total)
    state = run.resume(reward_accelerator, scheduler=scheduler)
    if state is None:
        state = {"step": 0, "drawn": {"demos": 0, "prefs": 0}, "reward_bias": None}
        state["initial"] = evaluate(run, 0, unwrapped, tokenizer, test, args, ref_policy, eval_reward_model)
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
            prompt = data.pad([r["prompt"] for r in rows] * args.rloo_k, pad_id, "left").to(device)
            completion, has_eos = common.generate(unwrapped, prompt, tokenizer, args.max_new_tokens, args.temperature)
        unique = prompt[: len(rows)]  # each prompt once: its forward is shared by its k samples
        # 2. score: s(x, y) of r_phi at EOS (--no-eos-score without), and log pi_ref(y|x) at tau_s
        with training.timer(times, "time/scoring"), torch.no_grad():
            ref_logps = common.completion_logprobs(ref_policy, unique, completion, pad_id, args.temperature).sum(1)
            scores = common.reward_scores(r_phi, unique, completion, pad_id, has_eos, args.no_eos_score)
            run.check_finite(update, reward=scores)
        # 3. one RLOO step, docs/aihf.md (A15)-(A17)
        with training.timer(times, "time/update"):
            logps = common.completion_logprobs(policy, unique, completion, pad_id, args.temperature).sum(1)
            kl = logps.detach() - ref_logps  # on-policy: log pi_theta is also the sampler's log-prob
            rewards = scores - args.kl_coef * kl  # docs/aihf.md (A15): R = s(x, y) - beta_KL * log(pi/pi_ref)
            advantages = rloo_advantages(rewards.view(args.rloo_k, -1)).flatten()  # docs/aihf.md (A16)
            policy_loss = -(advantages * logps).mean()  # docs/aihf.md (A17): REINFORCE, leave-one-out baseline
            run.check_finite(update, loss=policy_loss)
            accelerator.backward(policy_loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        metrics = {"objective/scores": scores.mean(), "objective/kl": kl.mean(), "loss/policy": policy_loss.detach()}
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
                    loss, stats = reward_phase_loss(reward_model, unwrapped, tokenizer, pairs, rows, args)
                    run.check_finite(update, reward_loss=loss)
                    reward_accelerator.backward(loss)
                    reward_optimizer.step()
                    reward_optimizer.zero_grad()
                    metrics.update(stats)
                recentre(r_phi, demo_rows[: args.center_demos], pad_id, device)
            metrics["rm/bias"] = r_phi.config.reward_bias
        metrics.update({"lr": scheduler.get_last_lr()[0], **times})
        metrics["time/samples_per_second"] = len(completion) / sum(times.values())
        run.log(metrics, update, show=("objective/scores", "objective/kl"))
        if update % args.eval_every == 0 and update < total:
            evaluate(run, update, unwrapped, tokenizer, test, args, ref_policy, eval_reward_model)
        drawn = {"demos": demos.drawn, "prefs": prefs.drawn}
        bias = getattr(r_phi.config, "reward_bias", None)
        run.step_done(update, {"initial": initial, "drawn": drawn, "reward_bias": bias})

    final = evaluate(run, total, unwrapped, tokenizer, test, args, ref_policy, eval_reward_model)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    common.save_model(reward_accelerator, reward_model, tokenizer, run.dir / "reward_model")
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main)
