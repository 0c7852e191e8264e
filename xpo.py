"""XPO: Exploratory Preference Optimization, following "Exploratory Preference Optimization: Harnessing
Implicit Q*-Approximation for Sample-Efficient RLHF" (Xie et al. 2024, https://arxiv.org/abs/2405.21046).

Online DPO with one extra term. Each update samples, for every prompt, one completion y from the current
policy pi_t and one completion y~ from the frozen reference pi_ref; a preference oracle (the reward model,
or the toy task's gold reward with --reward-model toy-gold) labels the pair into (y+, y-), ties going to the
policy sample, and the policy takes DPO steps on the labelled pairs plus the exploration bonus alpha*log pi(y~)
in the minimized loss. The bonus pushes probability away from what the reference already says (it maximizes
alpha*KL(pi_ref || pi) up to a constant): optimism toward responses pi_ref rarely produces. alpha = 0 is
online DPO (with asymmetric sampling), so `--alpha 0` is the baseline. Choices, as in TRL's XPOTrainer
unless stated: newest pairs only (`--replay` trains on Algorithm 1's cumulative buffer instead); the last
iterate is saved (Algorithm 1 picks the best iterate on validation); both samples are drawn at tau_s = 1
and scored at tau_s, the project rule (TRL samples at 0.9, scores at 1); a completion without EOS gets
--no-eos-score as its RM score, policy and reference sample alike (TRL subtracts a penalty of 1 instead).
Published values: alpha 1e-5 (paper schedule 1e-5, 5e-6, 0 over T = 3 iterations), beta 0.1, lr 5e-7, one
step per batch. Toy summed log-probs are ~-5 rather than ~-100, so the toy defaults are alpha 1e-2,
lr 5e-5 and 2 steps per batch.

    python xpo.py                                                  # toy task, CPU, ~1-2 minutes
    python xpo.py --alpha 0                                        # online DPO, for comparison
    python xpo.py --alpha 1e-2 5e-3 0 --replay                     # paper-like alpha schedule, Algorithm 1's buffer
    python xpo.py --reward-model toy-gold                          # the toy gold reward labels the pairs (oracle)
    python xpo.py --model trl-lib/pythia-1b-deduped-tldr-sft --reward-model trl-lib/pythia-1b-deduped-tldr-rm \
        --dataset trl-lib/tldr --alpha 1e-5 --beta 0.1 --lr 5e-7 --temperature 0.9 --batch-size 128 \
        --num-minibatches 1 --micro-batch-size 4 --total-episodes 100000 --max-prompt-length 512 --max-new-tokens 64
    accelerate launch --config_file configs/zero2.yaml xpo.py --model ... --reward-model ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import common
import data
import toy
import training
from training import Finite, NonNegative, Positive

# The toy tiers' defaults, which any flag given overrides (`--dataset toy-long --help` shows them): the gold reward as
# judge; toy-long's models and lengths
PRESETS = {
    "toy": dict(judge="toy:gold"),
    "toy-long": dict(
        judge="toy:gold", model="toy-long-sft", reward_model="toy-long-rm", max_prompt_length=64, max_new_tokens=48
    ),
}


@dataclass
class Args:
    # common
    exp_name: str = "xpo"
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
    """SFT policy to start from; a separate frozen copy is pi_ref, which samples y~ (`toy-sft` = the cached toy SFT
    model)"""
    reward_model: str = "toy-rm"
    """the preference oracle: labels the pairs by its scores, scores evaluations (`toy-rm` = the cached toy reward
    model; `toy-gold` = the toy task's programmatic gold reward, toy dataset only)"""
    reward_fn: str | None = None
    """a Python reward function instead of --reward-model: `module:function` or `path/file.py:function`, with TRL's
    signature fn(prompts, completions, **columns) -> list[float] (the dataset's other columns arrive aligned)"""
    lora_r: NonNegative[int] = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); the reference is then the adapter-disabled
    policy, not a second copy"""
    lora_alpha: Positive[float] = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """prompts (a `prompt` column): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a json/jsonl/parquet/csv
    file"""
    max_prompt_length: Positive[int] = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_new_tokens: Positive[int] = 8
    """completion length in tokens (TRL TL;DR example: 64)"""
    eval_prompts: Positive[int] = 500
    """test prompts used at each evaluation (greedy decoding)"""
    eval_every: NonNegative[int] = 16
    """evaluate every this many updates, before the first and after the last (0: only those)"""
    judge: str | None = None
    """the win rate of greedy completions against the test split's references under this judge: `module:function`,
    a local model, or an OpenAI-compatible URL http://HOST:PORT/v1 (the toy tiers' preset: `toy:gold`, gold reward)"""
    judge_model: str | None = None
    """the model name that an endpoint --judge serves"""
    judge_template: Literal["summary", "chat"] = "summary"
    """an LLM judge's prompt: the DPO paper's TL;DR summary comparison, or its dialogue (HH) comparison"""

    # algorithm
    alpha: tuple[NonNegative[float], ...] = (0.01,)
    """alpha, the exploration coefficient; K values split training into K equal segments, value k used in segment k
    (paper: 1e-5, 5e-6, 0; TRL: 1e-5)"""
    beta: Positive[float] = 0.1
    """beta, the KL strength of the DPO implicit reward beta*log(pi/pi_ref) (not PPO's --kl-coef; paper, TRL: 0.1)"""
    temperature: Positive[float] = 1.0
    """sampling temperature tau_s of both samples; every log-prob is computed from logits / tau_s (TRL samples at
    0.9, scores at 1)"""
    no_eos_score: Finite[float] = -1.0
    """RM score that replaces the score of a completion without EOS, policy and reference sample alike (N+: -1; TRL
    subtracts 1; `toy-gold` keeps the gold reward's own missing-EOS term)"""
    explore_from: Literal["reference", "policy"] = "reference"
    """who samples y~, the bonus-carrying second response: `reference` (Algorithm 1, TRL) or `policy` (the
    practical variant)"""
    replay: bool = False
    """train on the cumulative buffer D_t of Algorithm 1 (all pairs so far) instead of the newest pairs only (TRL's
    default)"""

    # optimization and batch sizes
    lr: NonNegative[float] = 5e-5
    """AdamW learning rate, decayed linearly to 0 (TRL: 5e-7)"""
    total_episodes: Positive[int] = 3072
    """prompts sampled over the whole run, two completions each"""
    batch_size: Positive[int] = 64
    """prompts per update (one pair each), over all processes"""
    update_epochs: Positive[int] = 1
    """passes over the pairs of each update; with --replay each pass draws batch_size pairs from D_t (TRL: 1 pass,
    1 step)"""
    num_minibatches: Positive[int] = 2
    """optimizer steps per pass (toy: 2 steps per batch of fresh pairs learn faster than TRL's 1)"""
    micro_batch_size: Positive[int] = 64
    """pairs per forward/backward; gradients accumulate up to a minibatch"""


def alpha_at(alphas: tuple[float, ...], update: int, num_updates: int) -> float:
    """The alpha schedule: K values split updates 1..num_updates into K equal segments (the last value
    also covers any remainder); update u uses alphas[(u - 1) * K // num_updates]."""
    return alphas[min(len(alphas) - 1, (update - 1) * len(alphas) // num_updates)]


def label_pairs(policy_scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """True where the policy sample y is preferred: y+ = y if s(y) >= s(y~) (ties go to the policy sample, as TRL)."""
    return policy_scores >= ref_scores


def chosen_rejected(policy_won: torch.Tensor, y: torch.Tensor, tilde: torch.Tensor):
    """(value of y+, value of y-) per pair, from the values of y and y~: y+ = y where the policy sample won."""
    return torch.where(policy_won, y, tilde), torch.where(policy_won, tilde, y)


def xpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, tilde_logps, beta: float, alpha: float
):
    """Per-pair XPO loss from summed completion log-probs: DPO on (y+, y-) plus alpha * log pi_theta(y~).
    Returns (losses, dpo_losses, bonus, chosen_rewards, rejected_rewards), rewards detached."""
    chosen_logratios = chosen_logps - ref_chosen_logps  # l_theta(y+) = log pi_theta/pi_ref (y+)
    rejected_logratios = rejected_logps - ref_rejected_logps  # l_theta(y-)
    # DPO Eq. (7) (Rafailov et al. 2023): -log sigmoid(beta * (l_theta(y+) - l_theta(y-)))
    dpo_losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # ALGO LOGIC
    # XPO Algorithm 1, step 4: L_t(pi) = alpha * sum log pi(y~|x) - sum log sigmoid(...): + sign in the minimized loss
    bonus = alpha * tilde_logps  # ALGO LOGIC
    return dpo_losses + bonus, dpo_losses, bonus, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def to_rows(prompt, completion, tilde, policy_won, ref_logps, ref_tilde_logps, pad_id):
    """One labelled pair per prompt, unpadded, so pairs of different updates can share a minibatch."""

    def strip(t):
        return [[i for i in row if i != pad_id] for row in t.tolist()]

    cols = zip(
        strip(prompt),
        strip(completion),
        strip(tilde),
        policy_won.tolist(),
        ref_logps.tolist(),
        ref_tilde_logps.tolist(),
    )
    return [dict(zip(("prompt", "y", "tilde", "policy_won", "ref_y", "ref_tilde"), c)) for c in cols]


def collate(rows, pad_id, device):
    """Prompts left-padded, once for both completions [y rows; y~ rows] (right-padded to one width)."""
    prompt = data.pad([r["prompt"] for r in rows], pad_id, "left").to(device)
    completion = data.pad([r["y"] for r in rows] + [r["tilde"] for r in rows], pad_id, "right").to(device)
    extra = {k: torch.tensor([r[k] for r in rows], device=device) for k in ("policy_won", "ref_y", "ref_tilde")}
    return prompt, completion, extra


def main(args: Args):
    accelerator = common.setup(args)
    device, is_toy, gold = (
        accelerator.device,
        args.dataset in toy.TIERS,
        args.reward_model in ("toy-gold", "toy-long-gold"),
    )
    per_process = args.batch_size // accelerator.num_processes
    num_updates = args.total_episodes // args.batch_size
    if args.batch_size % (accelerator.num_processes * args.num_minibatches) or num_updates == 0:
        raise training.UserError(
            f"--batch-size {args.batch_size} must be a multiple of {accelerator.num_processes} process(es) x "
            f"--num-minibatches {args.num_minibatches} and at most --total-episodes {args.total_episodes}"
        )
    if gold and not is_toy:
        raise training.UserError(
            "--reward-model toy-gold needs --dataset toy or toy-long (the gold reward judges the toy task)"
        )
    tokenizer = data.load_tokenizer(args.model)
    judge = common.load_judge(args)  # the evaluations' win rate against the test references
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    reward_model = common.load_reward(args, tokenizer, device)  # a frozen model, or --reward-fn's function

    train = data.load_data(args.dataset, "train", ("prompt",))
    test = data.load_data(args.dataset, "test", ("prompt",))
    test = test.select(range(min(args.eval_prompts, len(test))))
    prompts = data.tokenize_prompts(tokenizer, list(train["prompt"]), args.max_prompt_length)
    train_rows = train.to_list()

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / num_updates)  # linear to 0
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=2 * args.micro_batch_size)
    run = training.Run(args, accelerator, num_updates)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    order = torch.randperm(len(prompts), generator=generator).tolist()

    def evaluate(update):
        unwrapped = accelerator.unwrap_model(policy)
        return run.log_eval(update, *common.evaluate(unwrapped, tokenizer, test, args, ref_policy, reward_model, judge))

    state = run.resume(scheduler=scheduler)
    if state is None:
        initial, first, cursor, buffer = evaluate(0), 1, 0, []  # update 0: the SFT policy, pi_theta = pi_ref
    else:  # --resume: data position, generator and replay buffer where the checkpoint left them
        initial, first, cursor, order, buffer = (state[k] for k in ("initial", "step", "cursor", "order", "buffer"))
        first += 1
        generator.set_state(state["generator"])
    times = {}  # the last update's timings (none if a resumed run had no update left)
    for update in range(first, num_updates + 1):
        times, alpha = {}, alpha_at(args.alpha, update, num_updates)
        # ---- XPO Algorithm 1, step 1: x ~ rho, y ~ pi_t(.|x), y~ ~ pi_ref(.|x) (no gradients) ----
        with training.timer(times, "time/generation"), torch.no_grad():
            if cursor + per_process > len(order):
                order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
            rows = order[cursor : cursor + per_process]
            prompt = data.pad([prompts[i] for i in rows], pad_id, "left").to(device)
            cursor += per_process
            unwrapped = accelerator.unwrap_model(policy)
            completion, has_eos = common.generate(unwrapped, prompt, tokenizer, args.max_new_tokens, args.temperature)
            explorer = ref_policy if args.explore_from == "reference" else unwrapped
            tilde, tilde_eos = common.generate(explorer, prompt, tokenizer, args.max_new_tokens, args.temperature)
        # ---- step 2: the preference oracle labels (y, y~) -> (y+, y-); ties go to the policy sample ----
        with training.timer(times, "time/scoring"), torch.no_grad():
            width = max(completion.shape[1], tilde.shape[1])  # [y; y~] share each prompt's forward
            both = torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_id) for c in (completion, tilde)])
            no_eos = None if gold else args.no_eos_score  # the gold reward carries its own missing-EOS term
            examples = [train_rows[i] for i in rows]  # the dataset's columns, for a reward function
            both_eos = torch.cat([has_eos, tilde_eos])
            oracle = common.reward_scores(reward_model, prompt, both, pad_id, both_eos, no_eos, examples, tokenizer)
            scores, ref_scores = oracle.chunk(2)
            run.check_finite(update, reward=oracle)
            policy_won = label_pairs(scores, ref_scores)
            ref_both = common.completion_logprobs(ref_policy, prompt, both, pad_id, args.temperature).sum(1)
            ref_logps, ref_tilde_logps = ref_both.chunk(2)  # log pi_ref(y|x), log pi_ref(y~|x)
            # log pi_t(y|x) of the policy samples, for the KL and entropy metrics
            old_logps = common.completion_logprobs(unwrapped, prompt, completion, pad_id, args.temperature).sum(1)
        # ---- step 3: D_t = D_{t-1} + {(x, y+, y-, y~)} with --replay; else the newest pairs only (TRL) ----
        rows = to_rows(prompt, completion, tilde, policy_won, ref_logps, ref_tilde_logps, pad_id)
        buffer = buffer + rows if args.replay else rows

        # ---- step 4: pi_{t+1} ~ argmin_pi L_t(pi), warm-started from pi_t: update_epochs x num_minibatches steps ----
        with training.timer(times, "time/update"):
            stats = []
            for _ in range(args.update_epochs):
                perm = torch.randperm(len(buffer), generator=generator)[:per_process]  # replay: uniform over D_t
                for mb in perm.split(per_process // args.num_minibatches):
                    micro_batches, totals = mb.split(args.micro_batch_size), {}
                    for i, idx in enumerate(micro_batches):
                        with common.accumulate(accelerator, policy, last=i == len(micro_batches) - 1):
                            mb_prompt, mb_completion, b = collate([buffer[j] for j in idx], pad_id, device)
                            logps = common.completion_logprobs(
                                policy, mb_prompt, mb_completion, pad_id, args.temperature
                            ).sum(1)
                            logps_y, logps_tilde = logps.chunk(2)
                            chosen, rejected = chosen_rejected(b["policy_won"], logps_y, logps_tilde)
                            ref_chosen, ref_rejected = chosen_rejected(b["policy_won"], b["ref_y"], b["ref_tilde"])
                            losses, dpo_losses, bonus, r_c, r_r = xpo_loss(  # DPO Eq. (7) + alpha * log pi(y~)
                                chosen, rejected, ref_chosen, ref_rejected, logps_tilde, args.beta, alpha
                            )
                            loss = losses.mean()
                            run.check_finite(update, loss=loss)  # lower --lr or --alpha
                            accelerator.backward(loss * len(idx) / len(mb))
                        now = {
                            "loss/dpo": dpo_losses,
                            "loss/xpo": bonus,
                            "loss/total": losses,
                            "rewards/chosen": r_c,
                            "rewards/rejected": r_r,
                            "rewards/margins": r_c - r_r,
                            "rewards/accuracies": (r_c > r_r).float(),
                            "logps/chosen": chosen,
                            "logps/rejected": rejected,
                            "logps/tilde": logps_tilde,
                        }  # statistics: means over the minibatch
                        totals = {k: totals.get(k, 0.0) + v.sum().item() / len(mb) for k, v in now.items()}
                    stats.append(totals)
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
        # ---- (step 5 returns the best iterate on validation; like TRL, this script keeps the last) ----

        metrics = {
            "objective/scores": scores.mean(),
            "objective/ref_scores": ref_scores.mean(),
            "objective/kl": (old_logps - ref_logps).mean(),
            "objective/entropy": -old_logps.mean(),
            "objective/policy_win_rate": policy_won.float().mean(),
            "val/model_contain_eos_token": has_eos.float().mean(),
            "val/ref_contain_eos_token": tilde_eos.float().mean(),
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
            "alpha": alpha,
            "beta": args.beta,
            "lr": scheduler.get_last_lr()[0],
            "episodes": update * args.batch_size,
            "buffer_size": len(buffer),
            **times,
            "time/samples_per_second": per_process / sum(times.values()),
        }
        if is_toy:  # the gold reward of the policy samples: the smoothest learning curve on the toy task
            metrics["objective/gold"] = toy.gold_scores(prompt, completion, args.dataset).mean()
        run.log(metrics, update, show=("objective/scores", "objective/kl", "objective/policy_win_rate"))
        if args.eval_every and update % args.eval_every == 0 and update < num_updates:
            evaluate(update)
        loop = {"initial": initial, "cursor": cursor, "order": order, "buffer": buffer}
        run.step_done(update, {**loop, "generator": generator.get_state()})

    final = evaluate(num_updates)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
