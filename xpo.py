"""XPO: Exploratory Preference Optimization, following "Exploratory Preference Optimization: Harnessing
Implicit Q*-Approximation for Sample-Efficient RLHF" (Xie et al. 2024, https://arxiv.org/abs/2405.21046).

Online DPO with one extra term. Each update samples, for every prompt, one completion y from the current
policy pi_t and one completion y~ from the frozen reference pi_ref; a preference oracle (the reward model,
or the toy task's gold reward with --judge gold) labels the pair into (y+, y-), ties going to the policy
sample, and the policy takes DPO steps on the labelled pairs plus the exploration bonus alpha*log pi(y~) in
the minimized loss. The bonus pushes probability away from what the reference already says (it maximizes
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
    python xpo.py --model trl-lib/pythia-1b-deduped-tldr-sft --reward-model trl-lib/pythia-1b-deduped-tldr-rm \
        --dataset trl-lib/tldr --alpha 1e-5 --beta 0.1 --lr 5e-7 --temperature 0.9 --batch-size 128 \
        --num-minibatches 1 --micro-batch-size 4 --total-episodes 100000 --max-prompt-length 512 --max-new-tokens 64
    accelerate launch --config_file configs/zero2.yaml xpo.py --model ... --reward-model ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import common
import toy


@dataclass
class Args:
    # common
    exp_name: str = "xpo"
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
    """SFT policy to start from; a separate frozen copy is pi_ref, which samples y~ (`toy-sft` = the cached toy SFT model)"""
    reward_model: str = "toy-rm"
    """reward model: labels the pairs under --judge rm, scores evaluations (`toy-rm` = the cached toy reward model)"""
    judge: Literal["rm", "gold"] = "rm"
    """preference oracle: `rm` = reward-model scores; `gold` = the toy task's programmatic gold reward (toy only)"""
    lora_r: int = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); the reference is then the adapter-disabled policy, not a second copy"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """prompts (a `prompt` column): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a json/jsonl/parquet/csv file"""
    max_prompt_length: int = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_new_tokens: int = 8
    """completion length in tokens (TRL TL;DR example: 64)"""
    eval_prompts: int = 500
    """test prompts used at each evaluation (greedy decoding)"""
    eval_every: int = 25
    """evaluate every this many updates (and before the first and after the last)"""

    # algorithm
    alpha: tuple[float, ...] = (0.01,)
    """alpha, the exploration coefficient; K values split training into K equal segments, value k used in segment k (paper: 1e-5, 5e-6, 0; TRL: 1e-5)"""
    beta: float = 0.1
    """beta, the KL strength of the DPO implicit reward beta*log(pi/pi_ref) (paper, TRL: 0.1)"""
    temperature: float = 1.0
    """sampling temperature tau_s of both samples; every log-prob is computed from logits / tau_s (TRL samples at 0.9, scores at 1)"""
    no_eos_score: float = -1.0
    """RM score that replaces the score of a completion without EOS, policy and reference sample alike (N+: -1; TRL subtracts 1)"""
    explore_from: Literal["reference", "policy"] = "reference"
    """who samples y~, the bonus-carrying second response: `reference` (Algorithm 1, TRL) or `policy` (the practical variant)"""
    replay: bool = False
    """train on the cumulative buffer D_t of Algorithm 1 (all pairs so far) instead of the newest pairs only (TRL's default)"""

    # optimization and batch sizes
    lr: float = 5e-5
    """AdamW learning rate, decayed linearly to 0 (TRL: 5e-7)"""
    total_episodes: int = 3072
    """prompts sampled over the whole run, two completions each"""
    batch_size: int = 64
    """prompts per update (one pair each), over all processes"""
    epochs: int = 1
    """passes over the pairs of each update; with --replay each pass draws batch_size pairs from D_t (TRL: 1 pass, 1 step)"""
    num_minibatches: int = 2
    """optimizer steps per pass (toy: 2 steps per batch of fresh pairs learn faster than TRL's 1)"""
    micro_batch_size: int = 64
    """pairs per forward/backward; gradients accumulate up to a minibatch"""


def alpha_at(alphas: tuple[float, ...], update: int, num_updates: int) -> float:
    """The alpha schedule: K values split updates 1..num_updates into K equal segments (the last value
    also covers any remainder); update u uses alphas[(u - 1) * K // num_updates]."""
    return alphas[min(len(alphas) - 1, (update - 1) * len(alphas) // num_updates)]


def label_pairs(policy_scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """True where the policy sample y is preferred: y+ = y if s(y) >= s(y~) (ties go to the policy sample, as TRL)."""
    return policy_scores >= ref_scores


def xpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, tilde_logps, beta: float, alpha: float
):
    """Per-pair XPO loss from summed completion log-probs: DPO on (y+, y-) plus alpha * log pi_theta(y~).
    Returns (losses, dpo_losses, bonus, chosen_rewards, rejected_rewards), rewards detached."""
    chosen_logratios = chosen_logps - ref_chosen_logps  # l_theta(y+) = log pi_theta/pi_ref (y+)
    rejected_logratios = rejected_logps - ref_rejected_logps  # l_theta(y-)
    # DPO Eq. (7) of Rafailov et al.: -log sigmoid(beta * (l_theta(y+) - l_theta(y-)))
    dpo_losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # ALGO LOGIC
    # XPO Algorithm 1 line 4: L_t(pi) = alpha * sum log pi(y~|x) - sum log sigmoid(...): + sign in the minimized loss
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
    prompt = common.pad([r["prompt"] for r in rows], pad_id, "left").to(device)
    completion = common.pad([r["y"] for r in rows] + [r["tilde"] for r in rows], pad_id, "right").to(device)
    extra = {k: torch.tensor([r[k] for r in rows], device=device) for k in ("policy_won", "ref_y", "ref_tilde")}
    return prompt, completion, extra


def main(args: Args):
    accelerator = common.setup(args)
    device, is_toy = accelerator.device, args.dataset == "toy"
    per_process = args.batch_size // accelerator.num_processes
    num_updates = args.total_episodes // args.batch_size
    common.check_ranges(
        args,
        positive=("beta", "temperature", "max_new_tokens", "max_prompt_length", "epochs", "micro_batch_size"),
        non_negative=("lr", "save_every"),
    )
    if any(not a >= 0 for a in args.alpha):
        raise common.UserError(f"--alpha {' '.join(map(str, args.alpha))}: every alpha must be >= 0")
    if per_process == 0 or per_process % args.num_minibatches or num_updates == 0:
        raise common.UserError(
            f"--batch-size {args.batch_size} must be a multiple of --num-minibatches {args.num_minibatches} (per process) and at most --total-episodes {args.total_episodes}"
        )
    if args.judge == "gold" and not is_toy:
        raise common.UserError(
            "--judge gold needs --dataset toy (the gold reward is the toy task's judge); use --judge rm"
        )
    tokenizer = common.load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    reward_model = common.load_model(args.reward_model, "reward", tokenizer=tokenizer, frozen=True).to(device)

    train = common.load_data(args.dataset, "train", ("prompt",))
    test = common.load_data(args.dataset, "test", ("prompt",))
    test = test.select(range(min(args.eval_prompts, len(test))))
    references = test["completion"] if is_toy else None
    train_texts = list(train["prompt"])
    prompts = common.tokenize_prompts(tokenizer, train_texts, args.max_prompt_length)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / num_updates)  # linear to 0
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=2 * args.micro_batch_size)
    run = common.Run(args, accelerator, num_updates)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    order = torch.randperm(len(prompts), generator=generator).tolist()

    def run_eval(update):
        metrics, samples = common.evaluate(
            accelerator.unwrap_model(policy),
            tokenizer,
            test["prompt"],
            references,
            is_toy=is_toy,
            max_prompt=args.max_prompt_length,
            max_new_tokens=args.max_new_tokens,
            ref_model=ref_policy,
            reward_model=reward_model,
            no_eos_score=args.no_eos_score,
        )
        run.write_samples(samples, update)
        return run.log(metrics, update, show=("eval/win_rate", "eval/kl") if is_toy else ("eval/score", "eval/kl"))

    def judge(prompt, completion, has_eos, texts):
        """The preference oracle's score of each completion; the missing-EOS rule hits both samples alike."""
        if args.judge == "gold":  # the gold reward carries its own missing-EOS term
            decoded = tokenizer.batch_decode(completion, skip_special_tokens=True)
            return torch.tensor(
                [toy.gold_reward(p, t, bool(e)) for p, t, e in zip(texts, decoded, has_eos)], device=device
            )
        return common.reward_scores(reward_model, prompt, completion, pad_id, has_eos, args.no_eos_score)

    state = run.resume(scheduler=scheduler)
    if state is None:
        initial, first, cursor, buffer = run_eval(0), 1, 0, []  # step 0: the SFT policy, pi_theta = pi_ref
    else:  # --resume: data position, generator and replay buffer where the checkpoint left them
        initial, first, cursor, order, buffer = (state[k] for k in ("initial", "step", "cursor", "order", "buffer"))
        first += 1
        generator.set_state(state["generator"])
    start, times = time.time(), {}
    for update in range(first, num_updates + 1):
        times, alpha = {}, alpha_at(args.alpha, update, num_updates)
        # ---- XPO Algorithm 1, step 1: x ~ rho, y ~ pi_t(.|x), y~ ~ pi_ref(.|x) (no gradients) ----
        with common.timer(times, "time/generation"), torch.no_grad():
            if cursor + per_process > len(order):
                order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
            texts = [train_texts[i] for i in order[cursor : cursor + per_process]]
            prompt = common.pad([prompts[i] for i in order[cursor : cursor + per_process]], pad_id, "left").to(device)
            cursor += per_process
            unwrapped = accelerator.unwrap_model(policy)
            # log pi_t(y|x) of the samples (for the KL and entropy metrics) from the sampler itself: no extra forward
            completion, has_eos, sampled_logps = common.generate(
                unwrapped, prompt, tokenizer, args.max_new_tokens, args.temperature, return_logprobs=True
            )
            explorer = ref_policy if args.explore_from == "reference" else unwrapped
            tilde, tilde_eos = common.generate(explorer, prompt, tokenizer, args.max_new_tokens, args.temperature)
        # ---- step 2: the preference oracle labels (y, y~) -> (y+, y-); ties go to the policy sample ----
        with common.timer(times, "time/scoring"), torch.no_grad():
            width = max(completion.shape[1], tilde.shape[1])  # [y; y~] share each prompt's forward
            both = torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_id) for c in (completion, tilde)])
            scores, ref_scores = judge(prompt, both, torch.cat([has_eos, tilde_eos]), texts * 2).chunk(2)
            run.check_finite(update, reward=torch.cat([scores, ref_scores]))
            policy_won = label_pairs(scores, ref_scores)
            ref_logps, ref_tilde_logps = (
                common.completion_logprobs(ref_policy, prompt, both, pad_id, args.temperature).sum(1).chunk(2)
            )
            old_logps = sampled_logps.sum(1)
        # ---- step 3: D_t = D_{t-1} + {(x, y+, y-, y~)} with --replay; else the newest pairs only (TRL) ----
        rows = to_rows(prompt, completion, tilde, policy_won, ref_logps, ref_tilde_logps, pad_id)
        buffer = buffer + rows if args.replay else rows

        # ---- step 4: pi_{t+1} ~ argmin_pi L_t(pi), warm-started from pi_t: epochs x num_minibatches steps ----
        with common.timer(times, "time/update"):
            stats = []
            minibatch = per_process // args.num_minibatches
            for _ in range(args.epochs):
                perm = torch.randperm(len(buffer), generator=generator)[:per_process]  # replay: uniform over D_t
                for mb in perm.split(minibatch):
                    micro_batches = mb.split(args.micro_batch_size)
                    for i, idx in enumerate(micro_batches):
                        with common.accumulate(accelerator, policy, last=i == len(micro_batches) - 1):
                            mb_prompt, mb_completion, b = collate([buffer[i] for i in idx], pad_id, device)
                            logps_y, logps_tilde = (
                                common.completion_logprobs(policy, mb_prompt, mb_completion, pad_id, args.temperature)
                                .sum(1)
                                .chunk(2)
                            )
                            won = b["policy_won"]
                            losses, dpo_losses, bonus, r_c, r_r = xpo_loss(
                                torch.where(won, logps_y, logps_tilde),
                                torch.where(won, logps_tilde, logps_y),
                                torch.where(won, b["ref_y"], b["ref_tilde"]),
                                torch.where(won, b["ref_tilde"], b["ref_y"]),
                                logps_tilde,
                                args.beta,
                                alpha,
                            )
                            loss = losses.mean()
                            run.check_finite(update, loss=loss)  # lower --lr or --alpha
                            accelerator.backward(loss * len(idx) / len(mb))
                        stats.append(
                            {
                                "loss/dpo": dpo_losses.mean().item(),
                                "loss/xpo": bonus.mean().item(),
                                "loss/total": loss.item(),
                                "rewards/chosen": r_c.mean().item(),
                                "rewards/rejected": r_r.mean().item(),
                                "rewards/margins": (r_c - r_r).mean().item(),
                                "rewards/accuracies": (r_c > r_r).float().mean().item(),
                                "logps/chosen": torch.where(won, logps_y, logps_tilde).mean().item(),
                                "logps/rejected": torch.where(won, logps_tilde, logps_y).mean().item(),
                                "logps/tilde": logps_tilde.mean().item(),
                            }
                        )
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
        # (Algorithm 1, step 5, returns the best iterate on validation; like TRL, this script keeps the last)

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
            decoded = tokenizer.batch_decode(completion, skip_special_tokens=True)
            metrics["objective/gold"] = sum(
                toy.gold_reward(p, t, bool(e)) for p, t, e in zip(texts, decoded, has_eos)
            ) / len(texts)
        run.log(metrics, update, show=("objective/scores", "objective/kl", "objective/policy_win_rate"))
        run.advance()
        if update % args.eval_every == 0 and update < num_updates:
            run_eval(update)
        run.step_done(
            update,
            lambda: {
                "initial": initial,
                "cursor": cursor,
                "order": order,
                "buffer": buffer,
                "generator": generator.get_state(),
            },
        )

    final = run_eval(num_updates)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    if accelerator.is_main_process and is_toy:
        print(
            f"[xpo] win rate vs the reference summaries: SFT {initial['eval/win_rate']:.3f} -> XPO {final['eval/win_rate']:.3f} (KL {final['eval/kl']:.2f})"
        )
    print(
        f"[xpo] last update: {sum(times.values()):.3f} s ({', '.join(f'{k[5:]} {v:.3f}' for k, v in times.items())}), peak memory {common.peak_memory_mb():.0f} MiB"
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
