"""AIHF-DPO and Self-Play AIHF, from "Learning Reward and Policy Jointly from Demonstration and Preference Improves
Alignment" (Li, Zeng, Liao, Li, Kang, Garcia, Hong 2024, https://arxiv.org/abs/2406.06874; ICLR 2025).

AIHF learns a reward and a policy in one stage from two kinds of human feedback: demonstrations (prompt/completion,
the SFT data) and preference pairs (prompt/chosen/rejected), weighted by w_demo and w_pref. In AIHF-DPO one network
carries both, through the implicit reward beta * log(pi_theta/pi_ref) of DPO. Each update is one AdamW step on
    L = w_pref * mean_P[-log s(beta(l(y_w) - l(y_l)))] + w_demo * mean_D[-log s(beta(l(y_E) - l(y_gen)))]
with l = log pi_theta - log pi_ref: the DPO loss on a preference batch, and the same loss with each demonstration
y_E preferred over a completion y_gen that a frozen sampler drew for its prompt. AIHF-DPO draws y_gen once from
pi_ref; --self-play (Self-Play AIHF) splits the run into rounds and draws y_gen at each round from the iterate the
previous round ended at, which is also the round's reference (SPIN's recipe). The paper's equations were not
available: these losses are this project's reconstruction, derived in docs/aihf.md, whose labels (A1)-(A18) the
code cites. aihf_explicit.py is the variant with a separate reward model r_phi trained beside the policy.

    python aihf.py                                                 # toy task, AIHF-DPO, CPU, ~1.5 minutes
    python aihf.py --self-play                                     # Self-Play AIHF (3 rounds)
    python aihf.py --num-preferences 200                           # the paper's regime: few preferences
    python aihf.py --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr --dataset trl-lib/tldr \
        --preference-dataset trl-lib/tldr-preference --reward-model vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr \
        --beta 0.1 --lr 5e-7 --max-prompt-length 512 --max-completion-length 169 --max-new-tokens 53
    accelerate launch --config_file configs/zero2.yaml aihf.py --model ... --dataset ... --preference-dataset ...
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import common
import data
import toy
import training
from training import Finite, NonNegative, Positive

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
    exp_name: str = "aihf"
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
    """frozen reward model of the eval score, never trained (`toy-rm`: toy dataset only; None: no score)"""
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
    """w_pref: weight of the preference term, a mean over preference pairs (docs/aihf.md (A8); paper: not available)"""
    w_demo: NonNegative[float] = 1.0
    """w_demo: weight of the demonstration term, a mean over demonstrations (docs/aihf.md (A8); paper: not available)"""
    beta: Positive[float] = 0.1
    """KL strength of the implicit reward beta*log(pi/pi_ref), as DPO's beta, not PPO's --kl-coef (IRFT, TRL: 0.1)"""
    self_play: bool = False
    """Self-Play AIHF: y_gen re-sampled from the current iterate each round, the previous iterate as reference"""
    rounds: Positive[int] = 3
    """--self-play: number of rounds (SPIN iterations); the updates are split evenly between them"""
    pref_reference: Literal["previous", "sft"] = "previous"
    """--self-play: reference of the preference term, the previous iterate or the SFT model (paper: not specified)"""
    temperature: Positive[float] = 1.0
    """sampling temperature tau_s of y_gen; log-probs are scored at 1, as DPO's"""
    no_eos_score: Finite[float] = -1.0
    """eval score of a completion without EOS, in place of the reward model's (N+: -1)"""

    # optimization and batch sizes
    lr: NonNegative[float] = 1e-4
    """AdamW learning rate of the policy, decayed linearly to 0 (IRFT: 5e-7; TRL DPO: 1e-6)"""
    max_steps: Positive[int] = 100
    """updates: policy optimizer steps, each on one preference batch and one demonstration batch"""
    batch_size: Positive[int] = 64
    """preference pairs per update, over all processes"""
    demo_batch_size: Positive[int] = 32
    """demonstrations per update, each with one generated completion; a per-source mean, so it sets noise, not weight"""
    micro_batch_size: Positive[int] | None = None
    """pairs per forward/backward on each process; gradients accumulate up to the update's batches (default: all)"""


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


def sequence_logps(model, prompt, completion, pad_id):
    """log pi(y|x) at temperature 1 summed over completion tokens up to and including EOS, [2B] -> both halves."""
    return common.completion_logprobs(model, prompt, completion, pad_id).sum(1).chunk(2)


@torch.no_grad()
def sample(model, rows, tokenizer, args, device, chunk=256):
    """One completion per row from `model` at tau_s, cut after its first EOS, as lists of ids; and has_eos."""
    out, eos, pad_id = [], [], tokenizer.pad_token_id
    for i in range(0, len(rows), chunk):
        prompt = data.pad([r["prompt"] for r in rows[i : i + chunk]], pad_id, "left").to(device)
        completion, has_eos = common.generate(model, prompt, tokenizer, args.max_new_tokens, args.temperature)
        out += [row[row != pad_id].tolist() for row in completion.cpu()]
        eos += has_eos.tolist()
    return out, eos


def gold(tokenizer, rows, completions, has_eos) -> float:
    """Toy task only: the mean gold reward of sampled completions, the smoothest learning curve."""
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return sum(toy.gold_reward(r["text"], t, bool(e)) for r, t, e in zip(rows, texts, has_eos)) / len(rows)


@torch.no_grad()
def sample_round(opponent, rows, tokenizer, args, device):
    """docs/aihf.md (A7), (A11): y_gen ~ pi_opp once for every demonstration of the round, with log pi_opp(y_E) and
    log pi_opp(y_gen) stored (pi_opp is frozen during the round, so both stay fixed). Returns (rows, metrics)."""
    generated, has_eos = sample(opponent, rows, tokenizer, args, device)
    rows, pad_id = [dict(r, gen=g) for r, g in zip(rows, generated)], tokenizer.pad_token_id
    for i in range(0, len(rows), 256):
        batch = rows[i : i + 256]
        opp_demo, opp_gen = sequence_logps(opponent, *collate(batch, "demo", "gen", pad_id, device), pad_id)
        for r, d, g in zip(batch, opp_demo.tolist(), opp_gen.tolist()):
            r["ref_demo"], r["ref_gen"] = d, g
    stats = {"objective/eos_rate_generated": sum(has_eos) / len(has_eos)}
    if args.dataset in toy.TIERS:
        stats["objective/gold"] = gold(tokenizer, rows, data.pad(generated, pad_id, "right"), has_eos)
    return rows, stats


def preference_logps(policy, reference, rows, pad_id, device):
    """(log pi_theta(y_w), log pi_theta(y_l), log pi_ref(y_w), log pi_ref(y_l)) of a preference batch; the
    reference is pi_ref, or pi_opp in self-play with --pref-reference previous."""
    prompt, completion = collate(rows, "chosen", "rejected", pad_id, device)
    with torch.no_grad():
        ref_w, ref_l = sequence_logps(reference, prompt, completion, pad_id)
    return (*sequence_logps(policy, prompt, completion, pad_id), ref_w, ref_l)


def demonstration_logps(policy, rows, pad_id, device):
    """(log pi_theta(y_E), log pi_theta(y_gen), log pi_opp(y_E), log pi_opp(y_gen)); pi_opp's stored by sample_round."""
    ref_demo, ref_gen = (torch.tensor([r[k] for r in rows], device=device) for k in ("ref_demo", "ref_gen"))
    return (*sequence_logps(policy, *collate(rows, "demo", "gen", pad_id, device), pad_id), ref_demo, ref_gen)


def implicit_pair_loss(policy_a, policy_b, ref_a, ref_b, beta):
    """-log sigmoid(beta * (l(a) - l(b))) per pair with l = log pi_theta - log pi_ref: the DPO loss of `a`
    preferred over `b`. Also the detached implicit rewards beta * l(a), beta * l(b) (docs/aihf.md (A5))."""
    logratio_a, logratio_b = policy_a - ref_a, policy_b - ref_b
    losses = -F.logsigmoid(beta * (logratio_a - logratio_b))  # DPO Eq. (7), docs/aihf.md (A6) and (A7)
    return losses, beta * logratio_a.detach(), beta * logratio_b.detach()


def aihf_dpo_loss(pref_logps, demo_logps, beta, w_pref, w_demo):
    """docs/aihf.md (A8), and (A10) in self-play. pref_logps = (policy chosen, policy rejected, ref chosen, ref
    rejected); demo_logps = (policy demo, policy generated, ref demo, ref generated), ref = pi_ref or pi_opp; summed
    log-probs. A source whose weight is 0 may be None. Per-source means, never one pooled mean."""
    loss, stats = 0.0, {"w_pref": w_pref, "w_demo": w_demo}
    if w_pref:
        losses, chosen, rejected = implicit_pair_loss(*pref_logps, beta)
        loss = loss + w_pref * losses.mean()  # docs/aihf.md (A6): w_pref * mean_P[-log s(beta(l(y_w) - l(y_l)))]
        stats["loss/pref"] = losses.mean().detach()
        stats.update({"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean()})
        stats["rewards/pref_margin"] = (chosen - rejected).mean()
        stats["rewards/pref_accuracy"] = (chosen > rejected).float().mean()
    if w_demo:
        losses, demo, generated = implicit_pair_loss(*demo_logps, beta)
        loss = loss + w_demo * losses.mean()  # docs/aihf.md (A7): w_demo * mean_D[-log s(beta(l(y_E) - l(y_gen)))]
        stats["loss/demo"] = losses.mean().detach()
        stats.update({"rewards/demo": demo.mean(), "rewards/generated": generated.mean()})
        stats["rewards/demo_margin"] = (demo - generated).mean()
        stats["rewards/demo_accuracy"] = (demo > generated).float().mean()
    return loss, stats


def evaluate(run, update, policy, tokenizer, test, args, ref_policy, reward_model, judge):
    return run.log_eval(update, *common.evaluate(policy, tokenizer, test, args, ref_policy, reward_model, judge))


def main(args: Args):
    if not (args.w_pref or args.w_demo):
        raise training.UserError("--w-pref and --w-demo are both 0: nothing to learn from")
    accelerator = common.setup(args)
    if args.self_play and common.zero_stage() == 3:
        raise training.UserError("--self-play copies the policy into its opponent: ZeRO-3 shards it; use ZeRO-2")
    device, n_proc = accelerator.device, accelerator.num_processes
    per_pref, per_demo = args.batch_size // n_proc, args.demo_batch_size // n_proc
    rounds = args.rounds if args.self_play else 1
    steps_per_round = args.max_steps // rounds  # docs/aihf.md (A11): the remainder is dropped
    total = steps_per_round * rounds
    if min(per_pref, per_demo, steps_per_round) == 0:
        raise training.UserError(f"batch sizes must be >= the {n_proc} process(es) and --max-steps >= --rounds")
    tokenizer = data.load_tokenizer(args.model)
    judge = common.load_judge(args)  # the evaluations' win rate against the test references
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    reward_model = None  # frozen, the eval score only; the toy reward model fits the toy task only
    if args.reward_model is not None and (
        args.dataset in toy.TIERS or args.reward_model not in ("toy-rm", "toy-long-rm")
    ):
        reward_model = common.load_model(args.reward_model, "reward", tokenizer=tokenizer, frozen=True).to(device)
    demo_rows, pref_rows, test = load_feedback(args, tokenizer)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / total)  # linear to 0
    micro = args.micro_batch_size or max(per_pref, per_demo)  # pairs: 2 sequences each
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=2 * micro)
    unwrapped = accelerator.unwrap_model(policy)
    run = training.Run(args, accelerator, total)
    # Self-Play AIHF: each round's frozen opponent and reference is the iterate the previous round ended at
    opponent = copy.deepcopy(unwrapped).eval().requires_grad_(False) if args.self_play else None
    state = run.resume(scheduler=scheduler, **({"opponent": opponent} if opponent else {}))
    if state is None:
        state = {"step": 0, "drawn": {"demos": 0, "prefs": 0}, "round_rows": None}
        state["initial"] = evaluate(run, 0, unwrapped, tokenizer, test, args, ref_policy, reward_model, judge)
    initial, round_rows = state["initial"], state["round_rows"]
    rank_seed = args.seed + 100003 * accelerator.process_index  # independent shuffles of the two sources
    demos = Draws(demo_rows, rank_seed, state["drawn"]["demos"])
    prefs = Draws(pref_rows, rank_seed + 1, state["drawn"]["prefs"])
    times = {}
    for update in range(state["step"] + 1, total + 1):
        times, metrics, (rnd, j) = {}, {}, divmod(update - 1, steps_per_round)
        # 1. the round's opponent, docs/aihf.md (A10)-(A11): pi_ref in AIHF-DPO and round 0, then the last iterate
        if j == 0 and rnd > 0:
            opponent.load_state_dict(unwrapped.state_dict())
        opp = opponent if rnd > 0 else ref_policy
        pref_ref = opp if args.self_play and args.pref_reference == "previous" else ref_policy
        # 2. y_gen ~ pi_opp for all the round's demonstrations, with their log pi_opp: docs/aihf.md (A7), (A11)
        if j == 0 and args.w_demo:
            with training.timer(times, "time/generation"):
                round_rows, metrics = sample_round(opp, demos.take(steps_per_round * per_demo), tokenizer, args, device)
        with training.timer(times, "time/update"):
            # 3. y_w against y_l, docs/aihf.md (A6), 4. y_E against its y_gen, (A7): micro-batches of one source each
            demo_batch = (round_rows or [])[j * per_demo : (j + 1) * per_demo]  # none at w_demo = 0
            batches = [(prefs.take(per_pref * bool(args.w_pref)), args.w_pref, 0.0), (demo_batch, 0.0, args.w_demo)]
            jobs = [(b[i : i + micro], wp, wd) for b, wp, wd in batches for i in range(0, len(b), micro)]
            loss, stats = 0.0, {"w_pref": args.w_pref, "w_demo": args.w_demo}
            for i, (rows, w_pref, w_demo) in enumerate(jobs):
                with common.accumulate(accelerator, policy, last=i == len(jobs) - 1):
                    pref = preference_logps(policy, pref_ref, rows, pad_id, device) if w_pref else None
                    demo = demonstration_logps(policy, rows, pad_id, device) if w_demo else None
                    mb_loss, mb_stats = aihf_dpo_loss(pref, demo, args.beta, w_pref, w_demo)
                    run.check_finite(update, loss=mb_loss)  # lower --lr
                    share = len(rows) / (per_pref if w_pref else per_demo)  # per-source means over whole batches, (A8)
                    accelerator.backward(mb_loss * share)
                loss += mb_loss.detach() * share
                stats.update({k: stats.get(k, 0.0) + v * share for k, v in mb_stats.items() if not k.startswith("w_")})
            # 5. one AdamW step on L = w_pref * L_pref + w_demo * L_demo, docs/aihf.md (A8); (A10) in self-play
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        sequences = 2 * (per_pref * bool(args.w_pref) + per_demo * bool(args.w_demo))
        metrics.update({"loss": loss.detach(), **stats, "round": rnd, "lr": scheduler.get_last_lr()[0], **times})
        metrics["time/samples_per_second"] = sequences / times["time/update"]
        run.log(metrics, update, show=("loss/pref", "loss/demo"))
        if args.eval_every and update % args.eval_every == 0 and update < total:
            evaluate(run, update, unwrapped, tokenizer, test, args, ref_policy, reward_model, judge)
        drawn = {"demos": demos.drawn, "prefs": prefs.drawn}
        run.step_done(update, {"initial": initial, "drawn": drawn, "round_rows": round_rows})

    final = evaluate(run, total, unwrapped, tokenizer, test, args, ref_policy, reward_model, judge)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
