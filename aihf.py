"""AIHF: "Learning Reward and Policy Jointly from Demonstration and Preference Improves Alignment"
(Li, Zeng, Liao, Li, Kang, Garcia, Hong 2024, https://arxiv.org/abs/2406.06874; ICLR 2025).

AIHF trains the reward and the policy in a single stage from both kinds of human feedback: the
demonstrations that SFT uses (prompt/completion) and preference pairs (prompt/chosen/rejected), weighted
by w_demo and w_pref. What follows the paper's stated structure (abstract and OpenReview reviews): one
bi-level problem whose upper level fits the reward to the preferences and the policy to the
demonstrations, whose lower level is KL-regularized reward maximization; it reduces to RLHF / DPO; the
variants AIHF-DPO and Self-Play AIHF; its claim is about few preferences next to many demonstrations.
The paper's equations are NOT available: the losses below are this project's reconstruction
(lines marked [R]). For the KL optimum pi_r = pi_ref exp(r/beta)/Z, the likelihood
of a demonstration has the maximum-likelihood-IRL gradient E_demo[grad r] - E_{y~pi_r}[grad r]:
demonstrations are positives contrasted with the policy's own samples.
  --variant dpo (AIHF-DPO, default): one network, implicit reward beta*log(pi_theta/pi_ref), and
      L = w_pref * mean_P[-log s(beta(l(y_w) - l(y_l)))] + w_demo * mean_D[-log s(beta(l(y_E) - l(y_gen)))]
      with y_gen ~ pi_ref sampled once; --self-play re-samples y_gen from the current iterate each round,
      with the previous iterate pi_opp as the reference (SPIN's recipe; Self-Play AIHF).
  --variant explicit: a reward model r_phi and the policy in alternation. Reward phase [R]:
      w_pref * Bradley-Terry(preferences) - w_demo * (mean r(y_E) - mean r(y_pi)) on FRESH policy samples,
      then the scores are re-centred so the demonstrations score 0 (N+ bias). Policy phase (the project's
      choice, not the paper's): RLOO (Ahmadian et al. 2024, arXiv 2402.14740), k samples per prompt,
      leave-one-out baseline, reward r_phi(x, y) at EOS - kl_coef * sum_t log(pi/pi_ref).

    python aihf.py                                                 # toy task, AIHF-DPO, CPU, ~1.5 minutes
    python aihf.py --self-play                                     # Self-Play AIHF (3 rounds)
    python aihf.py --variant explicit                              # explicit reward model + RLOO, ~1 minute
    python aihf.py --num-preferences 200                           # the paper's regime: few preferences
    python aihf.py --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr --dataset trl-lib/tldr \
        --preference-dataset trl-lib/tldr-preference --reward-model vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr \
        --beta 0.1 --lr 5e-7 --max-prompt-length 512 --max-completion-length 169 --max-new-tokens 53
    accelerate launch --config_file configs/zero2.yaml aihf.py --model ... --dataset ... --preference-dataset ...
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import common
import toy

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class Args:
    # common
    exp_name: str = "aihf"
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
    """write a checkpoint to <run>/checkpoint every this many steps (0: only on Ctrl-C / SIGTERM)"""
    resume: str | None = None
    """continue the run in this directory (runs/<run>) from its checkpoint, with its saved arguments"""
    trust_remote_code: bool = False
    """allow Hub models that ship their own Python code (it runs on this machine: trusted models only)"""

    # model
    model: str = "toy-sft"
    """SFT policy to start from; also the frozen reference pi_ref (Hub id or local dir; `toy-sft` = the cached toy SFT model)"""
    reward_model: str | None = "toy-rm"
    """frozen reward model of the eval RM score (`toy-rm`: toy dataset only; None: no RM score); --variant explicit starts r_phi from it"""
    reward_init: str | None = None
    """--variant explicit: start r_phi from this instead (a causal LM such as `toy-sft` gets a fresh scalar head)"""
    lora_r: int = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); the reference is then the adapter-disabled policy, not a second copy"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """demonstrations, prompt/completion (the SFT data): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a file"""
    preference_dataset: str = "toy"
    """preference pairs, prompt/chosen/rejected: `toy`, a Hub id (trl-lib/tldr-preference), a save_to_disk dir or a file"""
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
    """evaluate every this many steps (and before the first and after the last)"""

    # algorithm
    variant: Literal["dpo", "explicit"] = "dpo"
    """`dpo`: AIHF-DPO, implicit reward beta*log(pi/pi_ref); `explicit`: a reward model and a policy in alternation"""
    w_pref: float = 1.0
    """w_pref: weight of the preference term, a mean over preference pairs (paper: NOT FOUND)"""
    w_demo: float = 1.0
    """w_demo: weight of the demonstration term, a mean over demonstrations (paper: NOT FOUND)"""
    beta: float = 0.1
    """beta: temperature of the implicit reward in both terms of --variant dpo (IRFT, TRL: 0.1)"""
    self_play: bool = False
    """--variant dpo: Self-Play AIHF, y_gen re-sampled from the current iterate each round, the previous iterate as reference"""
    rounds: int = 3
    """--self-play: number of rounds (SPIN iterations); the steps are split evenly between them"""
    pref_reference: Literal["previous", "sft"] = "previous"
    """--self-play: reference of the preference term, the previous iterate or the SFT model (paper: NOT FOUND)"""
    temperature: float = 1.0
    """sampling temperature tau_s of generated completions; --variant explicit scores its log-probs at it, --variant dpo at 1 (as DPO)"""
    kl_coef: float = 0.05
    """--variant explicit: beta_KL of the policy reward s(x, y) - beta_KL * sum_t log(pi/pi_ref) (N+: 0.05)"""
    rloo_k: int = 4
    """--variant explicit: samples per prompt in a policy update (k >= 2, leave-one-out baseline)"""
    no_eos_score: float = -1.0
    """score that replaces r_phi's score of a completion without EOS in the policy reward (N+: -1)"""
    policy_steps: int = 4
    """--variant explicit: K_pol, policy updates between two reward phases (paper: NOT FOUND)"""
    reward_steps: int = 1
    """--variant explicit: K_rew, reward-model steps per reward phase (paper: NOT FOUND)"""
    reward_lr: float = 2e-5
    """--variant explicit: AdamW learning rate of r_phi, kept small (the demonstration term is linear, unbounded)"""
    center_demos: int = 128
    """--variant explicit: demonstrations whose mean score is re-centred to 0 after each reward phase"""

    # optimization and batch sizes
    lr: float = 1e-4
    """AdamW learning rate of the policy, decayed linearly to 0 (IRFT: 5e-7; TRL DPO: 1e-6)"""
    total_steps: int = 100
    """policy optimizer steps (dpo: one per preference batch + demonstration batch; explicit: policy updates)"""
    batch_size: int = 64
    """preference pairs per step (dpo) or per reward step (explicit), over all processes"""
    demo_batch_size: int = 32
    """demonstrations per step (dpo) or per reward step (explicit), each with one generated completion; a per-source mean, so it sets noise, not weight"""
    rollout_prompts: int = 16
    """--variant explicit: prompts per policy update, rloo_k samples each"""


def tokenize_pairs(tokenizer, data, args):
    """Token ids of each (prompt, chosen + EOS, rejected + EOS), one shared prompt per pair."""
    rows = []
    for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"]):
        prompt, chosen = common.tokenize_pair(tokenizer, p, c, args.max_prompt_length, args.max_completion_length)
        prompt_r, rejected = common.tokenize_pair(tokenizer, p, r, args.max_prompt_length, args.max_completion_length)
        if prompt_r != prompt:  # a completion merged with the prompt's last token: keep the shorter prompt
            k = min(len(prompt), len(prompt_r))
            prompt, chosen, rejected = prompt[:k], prompt[k:] + chosen, prompt_r[k:] + rejected
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def collate(rows, first, second, pad_id, device):
    """The rows' prompts left-padded, once for both of their completions [first; second] (chosen/rejected, or
    demonstration/generated), right-padded to one width: each prompt runs once (common.shared_prompt_forward)."""
    prompt = common.pad([r["prompt"] for r in rows], pad_id, "left")
    completion = common.pad([r[first] for r in rows] + [r[second] for r in rows], pad_id, "right")
    return prompt.to(device), completion.to(device)


def sequence_logps(model, prompt, completion, pad_id, temperature=1.0):
    """log pi(y|x) summed over completion tokens up to and including EOS, [2B] -> (first, second) halves."""
    return common.completion_logprobs(model, prompt, completion, pad_id, temperature).sum(1).chunk(2)


def implicit_pair_loss(policy_a, policy_b, ref_a, ref_b, beta):
    """-log sigmoid(beta * (l(a) - l(b))) per pair with l = log pi_theta - log pi_ref: the DPO loss of `a`
    preferred over `b`. Also the detached implicit rewards beta * l(a), beta * l(b)."""
    logratio_a, logratio_b = policy_a - ref_a, policy_b - ref_b
    losses = -F.logsigmoid(beta * (logratio_a - logratio_b))  # ALGO LOGIC: DPO Eq. (7), as logsigmoid
    return losses, beta * logratio_a.detach(), beta * logratio_b.detach()


def aihf_dpo_loss(pref_logps, demo_logps, beta, w_pref, w_demo):
    """AIHF-DPO [R]. pref_logps = (policy chosen, policy rejected, ref chosen, ref rejected); demo_logps =
    (policy demo, policy generated, ref demo, ref generated), ref = pi_ref or, in self-play, pi_opp; summed
    log-probs. A source whose weight is 0 may be None. Per-source means, never one pooled mean."""
    loss, stats = 0.0, {"w_pref": w_pref, "w_demo": w_demo}
    if w_pref:
        losses, chosen, rejected = implicit_pair_loss(*pref_logps, beta)
        loss = loss + w_pref * losses.mean()  # ALGO LOGIC [R]: w_pref * mean_P[-log s(beta(l(y_w) - l(y_l)))]
        stats.update(
            {
                "loss/pref": losses.mean().detach(),
                "rewards/chosen": chosen.mean(),
                "rewards/rejected": rejected.mean(),
                "rewards/pref_margin": (chosen - rejected).mean(),
                "rewards/pref_accuracy": (chosen > rejected).float().mean(),
            }
        )
    if w_demo:
        losses, demo, generated = implicit_pair_loss(*demo_logps, beta)
        loss = loss + w_demo * losses.mean()  # ALGO LOGIC [R]: w_demo * mean_D[-log s(beta(l(y_E) - l(y_gen)))]
        stats.update(
            {
                "loss/demo": losses.mean().detach(),
                "rewards/demo": demo.mean(),
                "rewards/generated": generated.mean(),
                "rewards/demo_margin": (demo - generated).mean(),
                "rewards/demo_accuracy": (demo > generated).float().mean(),
            }
        )
    return loss, stats


def reward_loss(chosen, rejected, demo, policy, w_pref, w_demo):
    """Reward phase of --variant explicit [R], from r_phi scores: preference pairs (chosen, rejected) and
    demonstrations vs fresh policy samples on the same prompts (demo, policy; None when w_demo = 0)."""
    loss, stats = 0.0, {"w_pref": w_pref, "w_demo": w_demo}
    if w_pref:
        bt = -F.logsigmoid(chosen.float() - rejected.float()).mean()  # Bradley-Terry NLL, as reward.py
        loss = loss + w_pref * bt  # ALGO LOGIC [R]: w_pref * mean_P[-log s(r(y_w) - r(y_l))]
        stats.update(
            {"rm/bt_loss": bt.detach(), "rm/accuracy": (chosen > rejected).float().mean(), "loss/pref": bt.detach()}
        )
    if w_demo:
        demo_gap = demo.float().mean() - policy.float().mean()
        loss = loss - w_demo * demo_gap  # ALGO LOGIC [R]: - w_demo * (mean_D r(y_E) - mean r(y_pi)), 1/beta in w_demo
        stats.update({"rm/demo_gap": demo_gap.detach(), "loss/demo": -demo_gap.detach()})
    return loss, stats


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[k, n] rewards (sample j of prompt i at [j, i]) -> r minus the mean of the other k-1 samples."""
    k = rewards.shape[0]
    return rewards - (rewards.sum(0, keepdim=True) - rewards) / (k - 1)  # ALGO LOGIC: RLOO (Ahmadian et al. 2024)


def main(args: Args):
    is_toy = args.dataset == "toy"
    rm_name = args.reward_model if is_toy or args.reward_model != "toy-rm" else None  # the toy RM fits toy data only
    if args.variant == "explicit" and (
        args.self_play or args.rloo_k < 2 or min(args.policy_steps, args.reward_steps) < 1
    ):
        raise common.UserError(
            "--variant explicit needs --rloo-k >= 2, --policy-steps and --reward-steps >= 1, and no --self-play"
        )
    if args.variant == "explicit" and (args.reward_init or rm_name) is None:
        raise common.UserError("--variant explicit needs --reward-model or --reward-init: the starting point of r_phi")
    if not (args.w_pref or args.w_demo):
        raise common.UserError("--w-pref and --w-demo are both 0: nothing to learn from")
    common.check_ranges(
        args,
        positive=(
            "beta",
            "temperature",
            "total_steps",
            "rounds",
            "max_prompt_length",
            "max_completion_length",
            "max_new_tokens",
            "num_demonstrations",
            "num_preferences",
        ),
        non_negative=("lr", "w_pref", "w_demo", "kl_coef", "reward_lr", "center_demos", "save_every"),
    )
    accelerator = common.setup(args)
    device, n_proc = accelerator.device, accelerator.num_processes
    per_pref, per_demo, per_prompts = (
        args.batch_size // n_proc,
        args.demo_batch_size // n_proc,
        args.rollout_prompts // n_proc,
    )
    num_rounds = args.rounds if args.self_play else 1
    steps_per_round = args.total_steps // num_rounds
    total = steps_per_round * num_rounds
    if min(per_pref, per_demo, per_prompts, steps_per_round) == 0:
        raise common.UserError(f"batch sizes must be >= the {n_proc} process(es) and --total-steps >= --rounds")
    tokenizer = common.load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    scorer = None  # frozen reward model: the eval RM score only
    if rm_name is not None:
        scorer = common.load_model(rm_name, "reward", tokenizer=tokenizer, frozen=True).to(device)

    demos = common.load_data(args.dataset, "train", ("prompt", "completion"))
    prefs = common.load_data(args.preference_dataset, "train", PREFERENCE_COLUMNS)
    demos = demos.select(range(min(args.num_demonstrations or len(demos), len(demos))))
    prefs = prefs.select(range(min(args.num_preferences or len(prefs), len(prefs))))
    test = common.load_data(args.dataset, "test", ("prompt", "completion"))
    test = test.select(range(min(args.eval_prompts, len(test))))
    demo_rows = []
    for p, c in zip(demos["prompt"], demos["completion"]):
        prompt, demo = common.tokenize_pair(tokenizer, p, c, args.max_prompt_length, args.max_completion_length)
        demo_rows.append({"text": p, "prompt": prompt, "demo": demo})
    pref_rows = tokenize_pairs(tokenizer, prefs, args)
    print(f"[aihf] {len(demo_rows)} demonstrations, {len(pref_rows)} preference pairs, variant {args.variant}")

    def sampler(n, seed):  # endless shuffled indices, one independent sampler per data source
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield from torch.randperm(n, generator=generator).tolist()

    rank_seed = args.seed + 100003 * accelerator.process_index
    demo_it, pref_it = sampler(len(demo_rows), rank_seed), sampler(len(pref_rows), rank_seed + 1)
    drawn = {"demos": 0, "prefs": 0}  # indices drawn so far: the data position of a checkpoint

    def draw_demos(n):
        drawn["demos"] += n
        return [demo_rows[next(demo_it)] for _ in range(n)]

    def draw_prefs(n):
        drawn["prefs"] += n
        return [pref_rows[next(pref_it)] for _ in range(n)]

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / total)
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=2 * max(per_pref, per_demo))
    if args.self_play and common.zero_stage() == 3:
        raise common.UserError(
            "--self-play copies the policy into its opponent each round, which ZeRO-3's sharded weights do not allow: use ZeRO-2"
        )
    if args.variant == "explicit":  # r_phi: trained, separate from the frozen eval scorer
        reward_model = common.trainable(
            common.load_model(args.reward_init or rm_name, "reward", tokenizer=tokenizer), args
        )
        if getattr(reward_model, "retokenize", None) is not None:  # r_phi is trained on the policy's tokens
            raise common.UserError(
                f"{args.reward_init or rm_name} has its own tokenizer: --variant explicit trains r_phi on the policy's tokens and needs the policy's tokenizer"
            )
        reward_optimizer = torch.optim.AdamW(reward_model.parameters(), lr=args.reward_lr, eps=1e-5)
        # r_phi gets an Accelerator of its own: DeepSpeed trains one model per Accelerator (same processes)
        reward_accelerator = Accelerator()
        reward_model, reward_optimizer = common.prepare(
            reward_accelerator, reward_model, reward_optimizer, micro_batch_size=2 * max(per_pref, per_demo)
        )
        rm = reward_accelerator.unwrap_model(reward_model)
        center = [{"prompt": r["prompt"], "demo": r["demo"]} for r in demo_rows[: args.center_demos]]
    run = common.Run(args, accelerator, total)

    def run_eval(step):
        metrics, samples = common.evaluate(
            accelerator.unwrap_model(policy),
            tokenizer,
            test["prompt"],
            test["completion"],
            is_toy=is_toy,
            max_prompt=args.max_prompt_length,
            max_new_tokens=args.max_new_tokens,
            ref_model=ref_policy,
            reward_model=scorer,
            no_eos_score=args.no_eos_score,
        )
        run.write_samples(samples, step)
        return run.log(metrics, step, show=("eval/win_rate", "eval/kl") if is_toy else ("eval/score", "eval/kl"))

    @torch.no_grad()
    def sample(model, rows, chunk=256):
        """One completion per row from `model` at tau_s (truncated after the first EOS), with has_eos."""
        out, eos = [], []
        for i in range(0, len(rows), chunk):
            prompt = common.pad([r["prompt"] for r in rows[i : i + chunk]], pad_id, "left").to(device)
            completion, has_eos = common.generate(model, prompt, tokenizer, args.max_new_tokens, args.temperature)
            out += [row[row != pad_id].tolist() for row in completion.cpu()]
            eos += has_eos.tolist()
        return out, eos

    def gold(rows, completions, has_eos):  # toy only: mean gold reward of samples, the smooth learning curve
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        return sum(toy.gold_reward(r["text"], t, bool(e)) for r, t, e in zip(rows, texts, has_eos)) / len(rows)

    @torch.no_grad()
    def prepare_round(opp):
        """[R] y_gen ~ pi_opp, once, for every demonstration this round will use, and log pi_opp of the
        demonstration and of y_gen (pi_opp is frozen during the round, so both are fixed)."""
        rows = draw_demos(steps_per_round * per_demo)
        generated, has_eos = sample(opp, rows)
        rows = [dict(r, gen=g) for r, g in zip(rows, generated)]
        for i in range(0, len(rows), 256):
            ref_demo, ref_gen = sequence_logps(opp, *collate(rows[i : i + 256], "demo", "gen", pad_id, device), pad_id)
            for r, d, g in zip(rows[i : i + 256], ref_demo.tolist(), ref_gen.tolist()):
                r["ref_demo"], r["ref_gen"] = d, g
        stats = {"objective/eos_rate_generated": sum(has_eos) / len(has_eos)}
        if is_toy:
            stats["objective/gold"] = gold(rows, common.pad([r["gen"] for r in rows], pad_id, "right"), has_eos)
        return rows, stats

    def reward_step(step):
        """[R] One step of r_phi on a preference batch and on demonstrations vs FRESH policy samples."""
        chosen = rejected = demo = fresh = None
        if args.w_pref:
            pairs = collate(draw_prefs(per_pref), "chosen", "rejected", pad_id, device)
            chosen, rejected = common.reward_scores(reward_model, *pairs, pad_id).chunk(2)
        if args.w_demo:  # the only place policy samples enter the reward: never read when w_demo = 0
            rows = draw_demos(per_demo)
            rows = [dict(r, gen=g) for r, g in zip(rows, sample(unwrapped, rows)[0])]
            demo, fresh = common.reward_scores(
                reward_model, *collate(rows, "demo", "gen", pad_id, device), pad_id
            ).chunk(2)
        loss, stats = reward_loss(chosen, rejected, demo, fresh, args.w_pref, args.w_demo)
        run.check_finite(step, reward_loss=loss)
        reward_accelerator.backward(loss)
        reward_optimizer.step()
        reward_optimizer.zero_grad()
        return stats

    @torch.no_grad()
    def recentre():
        """Shift r_phi so the first center_demos demonstrations score 0 on average (the N+ reward bias):
        the missing-EOS score and the KL coefficient keep their meaning while the reward moves."""
        prompt, completion = collate(center, "demo", "demo", pad_id, device)
        rm.config.reward_bias = (
            getattr(rm.config, "reward_bias", 0.0) + common.reward_scores(rm, prompt, completion, pad_id).mean().item()
        )

    unwrapped = accelerator.unwrap_model(policy)
    # Self-Play AIHF: each round's frozen opponent (and reference) is the iterate the previous round ended at
    opponent = copy.deepcopy(unwrapped).eval().requires_grad_(False) if args.self_play else None
    if args.variant == "dpo":
        state = run.resume(scheduler=scheduler, **({"opponent": opponent} if opponent else {}))
    else:
        state = run.resume(reward_accelerator, scheduler=scheduler)
    if state is None:
        initial, first, round_rows = run_eval(0), 1, None
    else:  # --resume: fast-forward the index samplers; this round's generated rows and r_phi's bias come back
        initial, first, round_rows = state["initial"], state["step"] + 1, state["round_rows"]
        for _ in range(state["drawn"]["demos"]):
            next(demo_it)
        for _ in range(state["drawn"]["prefs"]):
            next(pref_it)
        drawn.update(state["drawn"])
        if args.variant == "explicit":
            rm.config.reward_bias = state["reward_bias"]
    start, times = time.time(), {}
    if args.variant == "dpo":
        for step in range(first, total + 1):
            rnd, j = divmod(step - 1, steps_per_round)
            # pi_opp: pi_ref in AIHF-DPO and in the first self-play round (pi_0 = SFT), then the previous iterate
            opp = opponent if rnd > 0 else ref_policy
            if j == 0 and rnd > 0:
                opponent.load_state_dict(unwrapped.state_dict())
            pref_ref = opp if args.self_play and args.pref_reference == "previous" else ref_policy
            if j == 0 and args.w_demo:
                t0 = time.perf_counter()
                round_rows, round_stats = prepare_round(opp)
                run.log({**round_stats, "round": rnd, "time/round_generation": time.perf_counter() - t0}, step)
            times = {}
            with common.timer(times, "time/update"):
                pref_logps = demo_logps = None
                if args.w_pref:
                    prompt, completion = collate(draw_prefs(per_pref), "chosen", "rejected", pad_id, device)
                    with torch.no_grad():
                        ref_w, ref_l = sequence_logps(pref_ref, prompt, completion, pad_id)
                    pref_logps = (*sequence_logps(policy, prompt, completion, pad_id), ref_w, ref_l)
                if args.w_demo:
                    rows = round_rows[j * per_demo : (j + 1) * per_demo]
                    ref_d, ref_g = (torch.tensor([r[k] for r in rows], device=device) for k in ("ref_demo", "ref_gen"))
                    demo_logps = (
                        *sequence_logps(policy, *collate(rows, "demo", "gen", pad_id, device), pad_id),
                        ref_d,
                        ref_g,
                    )
                loss, stats = aihf_dpo_loss(pref_logps, demo_logps, args.beta, args.w_pref, args.w_demo)
                run.check_finite(step, loss=loss)  # lower --lr
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            run.advance()
            n_seq = 2 * (per_pref * bool(args.w_pref) + per_demo * bool(args.w_demo))
            run.log(
                {
                    "loss": loss.detach(),
                    **stats,
                    "lr": scheduler.get_last_lr()[0],
                    **times,
                    "time/samples_per_second": n_seq / times["time/update"],
                },
                step,
                show=("loss/pref", "loss/demo"),
            )
            if step % args.eval_every == 0 and step < total:
                run_eval(step)
            run.step_done(step, lambda: {"initial": initial, "drawn": dict(drawn), "round_rows": round_rows})
    else:
        for step in range(first, total + 1):
            times = {}
            # ---- policy phase: one RLOO update on the current r_phi (k samples of each prompt) ----
            with common.timer(times, "time/generation"), torch.no_grad():
                rows = draw_demos(per_prompts)
                prompt = common.pad([r["prompt"] for r in rows] * args.rloo_k, pad_id, "left").to(device)
                completion, has_eos = common.generate(
                    unwrapped, prompt, tokenizer, args.max_new_tokens, args.temperature
                )
            unique = prompt[: len(rows)]  # each prompt once: its forward is shared by its k samples
            with common.timer(times, "time/scoring"), torch.no_grad():
                ref_logps = common.completion_logprobs(ref_policy, unique, completion, pad_id, args.temperature).sum(1)
                scores = common.reward_scores(rm, unique, completion, pad_id, has_eos, args.no_eos_score)
                run.check_finite(step, reward=scores)
            with common.timer(times, "time/update"):
                logps = common.completion_logprobs(policy, unique, completion, pad_id, args.temperature).sum(1)
                kl = logps.detach() - ref_logps  # on-policy: log pi_theta is also the sampler's log-prob
                rewards = scores - args.kl_coef * kl  # ALGO LOGIC: s(x, y) - beta_KL * sum_t log(pi/pi_ref)
                advantages = rloo_advantages(rewards.view(args.rloo_k, -1)).flatten()
                policy_loss = -(advantages * logps).mean()  # ALGO LOGIC: REINFORCE with the leave-one-out baseline
                run.check_finite(step, loss=policy_loss)
                accelerator.backward(policy_loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            metrics = {
                "objective/scores": scores.mean(),
                "objective/kl": kl.mean(),
                "objective/rlhf_reward": rewards.mean(),
                "objective/entropy": -logps.detach().mean(),
                "objective/eos_rate": has_eos.float().mean(),
                "objective/length": (completion != pad_id).sum(1).float().mean(),
                "loss/policy": policy_loss.detach(),
            }
            if is_toy:
                metrics["objective/gold"] = gold(rows * args.rloo_k, completion, has_eos)
            # ---- reward phase [R]: K_rew steps on preferences + demonstrations vs FRESH policy samples ----
            if step % args.policy_steps == 0:
                with common.timer(times, "time/reward"):
                    for _ in range(args.reward_steps):
                        metrics.update(reward_step(step))
                    recentre()
                metrics["rm/bias"] = rm.config.reward_bias
            metrics.update(
                {
                    "lr": scheduler.get_last_lr()[0],
                    **times,
                    "time/samples_per_second": len(completion) / sum(times.values()),
                }
            )
            run.log(metrics, step, show=("objective/scores", "objective/kl"))
            run.advance()
            if step % args.eval_every == 0 and step < total:
                run_eval(step)
            run.step_done(
                step,
                lambda: {
                    "initial": initial,
                    "drawn": dict(drawn),
                    "round_rows": None,
                    "reward_bias": rm.config.reward_bias,
                },
            )

    final = run_eval(total)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    if args.variant == "explicit":
        common.save_model(reward_accelerator, reward_model, tokenizer, run.dir / "reward_model")
    if accelerator.is_main_process:
        if is_toy:
            print(
                f"[aihf] win rate vs the reference summaries: SFT {initial['eval/win_rate']:.3f} -> AIHF {final['eval/win_rate']:.3f} (KL {final['eval/kl']:.2f})"
            )
        print(
            f"[aihf] last update: {sum(times.values()):.3f} s ({', '.join(f'{k[5:]} {v:.3f}' for k, v in times.items())}), peak memory {common.peak_memory_mb():.0f} MiB"
        )
    initial = {f"initial/{k.removeprefix('eval/')}": v for k, v in initial.items()}
    run.finish(
        {
            **initial,
            **final,
            "time/total": time.time() - start,
            "time/update_last": sum(times.values()),
            "memory/peak_mb": common.peak_memory_mb(),
        }
    )


if __name__ == "__main__":
    common.run_cli(Args, main)
