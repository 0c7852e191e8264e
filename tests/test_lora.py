"""LoRA through peft: the reference is the adapter-disabled policy (no second copy), the saved model is
merged, and the scripts run with it (together with --gradient-checkpointing)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from toy_batches import toy_batch

import aihf
import common
import data
import dpo
import ppo
import rebel
import sft
import xpo

pytest.importorskip("peft")


def test_adapter_disabled_reference_is_the_base_model_after_training(toy_cache):
    tokenizer = data.load_tokenizer("toy-sft")
    prompt, completion = toy_batch(tokenizer)
    base = common.load_model("toy-sft").eval()
    policy = common.apply_lora(common.load_model("toy-sft"), r=4, alpha=8)
    ref = common.reference_model("toy-sft", policy, lora_r=4, device="cpu")
    pad = tokenizer.pad_token_id
    expected = common.completion_logprobs(base, prompt, completion, pad)
    # at initialization LoRA's B is 0: policy, reference and base model agree
    torch.testing.assert_close(common.completion_logprobs(policy, prompt, completion, pad), expected)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = -common.completion_logprobs(policy, prompt, completion, pad).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = common.completion_logprobs(policy, prompt, completion, pad)
    assert (moved - expected).abs().max() > 1e-2  # the policy learned
    ref_logps = common.completion_logprobs(ref, prompt, completion, pad)
    torch.testing.assert_close(ref_logps, expected)  # the reference did not
    assert not ref_logps.requires_grad
    # and the adapters are back on afterwards
    torch.testing.assert_close(common.completion_logprobs(policy, prompt, completion, pad), moved)
    # generation from the reference is the base model's (greedy: deterministic)
    p = prompt[:3]
    torch.testing.assert_close(
        common.generate(ref, p, tokenizer, 6, 0.0)[0], common.generate(base, p, tokenizer, 6, 0.0)[0]
    )


def test_dpo_with_lora_starts_at_ln2_and_saves_a_merged_model(toy_cache, tmp_path):
    args = dpo.Args(
        output_dir=str(tmp_path),
        run_name="lora",
        lora_r=4,
        lora_alpha=8,
        max_steps=2,
        batch_size=8,
        eval_prompts=8,
        eval_pairs=16,
        eval_every=1,
        lr=1e-2,
    )
    dpo.main(args)
    run_dir = tmp_path / "lora"
    initial = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert initial["step"] == 0 and initial["eval/loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert initial["eval/kl"] == pytest.approx(0.0, abs=1e-5)
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    merged = load_file(run_dir / "model.safetensors")
    assert not any("lora" in k for k in merged)  # a plain model: later stages load it as --model
    reloaded = common.load_model(str(run_dir))
    base = common.load_model("toy-sft")
    assert any(not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize(
    "module, kw",
    [
        (sft, dict(model="toy-sft", max_steps=2, batch_size=8, eval_prompts=4)),
        (ppo, dict(total_episodes=16, batch_size=8, eval_prompts=4)),
        (rebel, dict(total_episodes=16, batch_size=8, eval_prompts=4)),
        (xpo, dict(total_episodes=16, batch_size=8, eval_prompts=4, explore_from="reference")),
        (
            aihf,
            dict(
                max_steps=2,
                batch_size=4,
                demo_batch_size=4,
                num_demonstrations=32,
                num_preferences=32,
                eval_prompts=4,
            ),
        ),
    ],
    ids=["sft", "ppo", "rebel", "xpo", "aihf"],
)
def test_scripts_run_with_lora_and_gradient_checkpointing(module, kw, toy_cache, tmp_path):
    module.main(
        module.Args(output_dir=str(tmp_path), run_name="r", lora_r=4, lora_alpha=8, gradient_checkpointing=True, **kw)
    )
    final = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert all(v == v for v in final.values())  # no NaN
    if "initial/kl" in final:
        assert final["initial/kl"] == pytest.approx(0.0, abs=1e-5)
