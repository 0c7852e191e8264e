"""Numeric flags: each one declares its range in its type (`batch_size: Positive[int]`), one place checks them all
(training.check_args, the first thing common.setup does), and every script refuses each flag just outside its range
with one `error:` line naming the flag and exit code 2, before anything uses the value."""

import dataclasses
import math
import sys
import typing

import pytest

import aihf
import aihf_explicit
import dpo
import drpo
import grpo
import ppo
import rebel
import reward
import rloo
import sft
import training
import xpo

SCRIPTS = [sft, reward, dpo, ppo, drpo, rebel, xpo, rloo, grpo, aihf, aihf_explicit]


def ranged_fields(module) -> dict[str, training.Range]:
    hints = typing.get_type_hints(module.Args, include_extras=True)
    return {f.name: r for f in dataclasses.fields(module.Args) for r in training.declared_ranges(hints[f.name])}


def outside(allowed: training.Range) -> str:
    """The value just outside a range: 0 where it must be positive, -1 where non-negative, above its top."""
    if allowed.low == -math.inf:
        return "nan"
    if allowed.open_low:
        return f"{allowed.low:g}"
    return f"{allowed.low - 1:g}" if allowed.high == math.inf else f"{allowed.high + 0.5:g}"


CASES = [(m, name, allowed) for m in SCRIPTS for name, allowed in ranged_fields(m).items()]


def is_numeric(tp) -> bool:
    return tp in (int, float) or any(is_numeric(arg) for arg in typing.get_args(tp))  # through | None, tuple[...]


def test_every_numeric_flag_declares_its_range():
    for module in SCRIPTS:
        hints = typing.get_type_hints(module.Args)  # Annotated stripped: the plain types
        numeric = {name for name, tp in hints.items() if is_numeric(tp)}
        assert numeric == set(ranged_fields(module)), (module.__name__, numeric ^ set(ranged_fields(module)))


@pytest.mark.parametrize(
    "module, name, allowed", CASES, ids=[f"{m.__name__}--{n.replace('_', '-')}" for m, n, _ in CASES]
)
def test_a_flag_just_outside_its_range_is_one_error_line(module, name, allowed, monkeypatch, capsys, tmp_path):
    flag, value = f"--{name.replace('_', '-')}", outside(allowed)
    given = [flag, value] if name == "alpha" else [f"{flag}={value}"]  # alpha: a tuple, its values follow the flag
    argv = ["--output-dir", str(tmp_path), *given]
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    with pytest.raises(SystemExit) as e:
        training.run_cli(module.Args, module.main)
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {flag} ") and f"must be {allowed}" in lines[0], lines
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("module, value", [(m, v) for m in SCRIPTS for v in ("0", "-1")])
def test_zero_and_minus_one_where_they_are_allowed(module, value):
    """`--seed 0`, `--save-every 0`, `--lora-r 0`, `--eval-every 0` (only the first and last evaluations) pass."""
    for name, allowed in ranged_fields(module).items():
        if name in ("seed", "save_every", "lora_r", "eval_every") and value == "0":
            assert 0 in allowed, name
        if name == "no_eos_score":
            assert float(value) in allowed


def test_a_flag_given_wins_over_the_toy_long_preset(monkeypatch, capsys):
    """`--dataset toy-long` takes the tier's preset as defaults (`--help` shows them); every flag given wins."""
    import sft

    runs = []
    for argv in (["--dataset", "toy-long", "--lr", "1e-3"], ["--dataset=toy-long"], ["--lr", "3e-3"], []):
        monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
        training.run_cli(sft.Args, runs.append, sft.PRESETS)
    typed, preset, short, default = runs
    assert typed.lr == 1e-3 and (typed.model, typed.batch_size, typed.max_new_tokens) == ("toy-long", 32, 48)
    assert preset.lr == 3e-3 and preset.lr_schedule == "wsd" and preset.judge == "toy:gold"
    assert short.lr == 3e-3 and (short.model, short.batch_size, short.max_new_tokens) == ("toy", 64, 8)
    assert default == sft.Args(judge="toy:gold")  # the default dataset's preset: the toy's judge
    monkeypatch.setattr(sys, "argv", ["sft.py", "--dataset", "toy-long", "--help"])
    with pytest.raises(SystemExit):
        training.run_cli(sft.Args, runs.append, sft.PRESETS)
    help_text = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the table's borders and wrapping out
    assert "(default: 0.003)" in help_text and "(default: toy-long)" in help_text
