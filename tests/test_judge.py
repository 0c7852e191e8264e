"""judge.py: the win rate against reference completions under a judge. Function judges (pointwise and pairwise)
against hand-computed win rates, the verdict parser, both orders and ties of LLM judges, a tiny local model judging
in-process, a real `transformers serve` endpoint over HTTP, and the command line on a finished run's samples."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port

import judge
import training
from training import UserError

JUDGE_FNS = textwrap.dedent(
    '''
    """Judge functions for tests/test_judge.py."""


    def length(prompts, completions, **columns):
        """Pointwise, TRL's reward-function signature: the longer completion is the better."""
        return [len(c) for c in completions]


    def shorter(prompts, completions_a, completions_b):
        """Pairwise: 1 when a is shorter, 0 when b is, 0.5 at equal length, None when either holds a '?'."""
        return [
            None if "?" in a + b else 0.5 if len(a) == len(b) else float(len(a) < len(b))
            for a, b in zip(completions_a, completions_b)
        ]


    def wrong_length(prompts, completions, **columns):
        return [1.0]


    def two_args(p, c):
        return [0.0] * len(c)
    '''
)
PROMPTS = ["p1", "p2", "p3", "p4", "p5"]
COMPLETIONS = ["aaa", "bb", "c", "dddd", "e?"]
REFERENCES = ["a", "bb", "ccc", "dd", "ee"]


@pytest.fixture(scope="module")
def fns_dir(tmp_path_factory):
    """A folder on sys.path holding judge_fns.py, as a user's own module would be."""
    folder = tmp_path_factory.mktemp("fns")
    (folder / "judge_fns.py").write_text(JUDGE_FNS)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield folder


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory) -> str:
    """A tiny random Qwen2 (ChatML template) with its tokenizer: its answers name neither summary. Its context is
    stretched to 4096 positions (RoPE: no table to outgrow): a judge's prompt is longer than its 256 tokens, which
    transformers serve enforces."""
    import tiny_models

    path = tiny_models.save_tiny(tmp_path_factory.mktemp("judge_models"), "qwen2")[0]
    config = json.loads((Path(path) / "config.json").read_text())
    (Path(path) / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return path


def test_pointwise_function(fns_dir):
    j = judge.load_judge("judge_fns:length")
    assert j.kind == "pointwise"
    metrics, judgments = judge.win_rate(j, PROMPTS, COMPLETIONS, REFERENCES)
    # lengths 3-1 win, 2-2 tie, 1-3 loss, 4-2 win, 2-2 tie
    assert metrics == {
        "eval/win_rate": 3 / 5,
        "eval/judge_ties": 2 / 5,
        "eval/judge_score": 12 / 5,
        "eval/judge_score_reference": 10 / 5,
    }
    assert [j["outcome"] for j in judgments] == [1.0, 0.5, 0.0, 1.0, 0.5]
    assert judgments[0] == dict(prompt="p1", completion="aaa", reference="a", score=3.0, score_reference=1.0, outcome=1)


def test_pairwise_function(fns_dir):
    j = judge.load_judge("judge_fns:shorter")
    assert j.kind == "pairwise"
    metrics, judgments = judge.win_rate(j, PROMPTS, COMPLETIONS, REFERENCES)
    # the policy's completion is a: longer (0), equal (0.5), shorter (1), longer (0), '?' (None: 0.5)
    assert metrics == {"eval/win_rate": 2 / 5, "eval/judge_ties": 2 / 5}
    assert [j["verdict"] for j in judgments] == [0.0, 0.5, 1.0, 0.0, None]
    assert [j["outcome"] for j in judgments] == [0.0, 0.5, 1.0, 0.0, 0.5]


def test_function_kind_by_signature():
    """**kwargs: pointwise; exactly three positional parameters: pairwise; else TRL's keyword call must bind."""
    kind = lambda fn: judge.function_kind(fn, "test:fn")  # noqa: E731
    assert kind(lambda prompts, completions, **columns: 0) == "pointwise"
    assert kind(lambda completions, **kwargs: 0) == "pointwise"  # TRL functions often skip the prompts
    assert kind(lambda a, b, c, **kwargs: 0) == "pointwise"
    assert kind(lambda prompts, completions: 0) == "pointwise"
    assert kind(lambda prompts, a, b: 0) == "pairwise"
    with pytest.raises(UserError, match="a judge function is"):
        kind(lambda p, c: 0)


def test_spec_mistakes_are_one_line_user_errors(fns_dir, tmp_path):
    cases = [
        ("no_such_module_xyz:fn", {}, "cannot import 'no_such_module_xyz'"),
        ("judge_fns:nope", {}, "has no function 'nope'"),
        ("judge_fns:two_args", {}, "a judge function is"),
        ("http://127.0.0.1:1/v1", {}, "needs --judge-model"),
        (f"http://127.0.0.1:{free_port()}/v1", {"judge_model": "m"}, "no OpenAI-compatible server answers"),
        (str(tmp_path / "missing"), {}, "cannot load a causal LM"),
        ("judge_fns:length", {"template": "poem"}, "--judge-template poem"),
    ]
    for spec, kwargs, message in cases:
        with pytest.raises(UserError, match=message) as e:
            judge.load_judge(spec, **kwargs)
        assert "\n" not in str(e.value), spec
    with pytest.raises(UserError, match="must return a list of 10 scores"):
        judge.win_rate(judge.load_judge("judge_fns:wrong_length"), PROMPTS, COMPLETIONS, REFERENCES)


@pytest.mark.parametrize(
    "response, key, choice",
    [
        ("Comparison: A covers the breakup, B does not.\nPreferred: A", "Preferred", "A"),
        ("Comparison: B is shorter.\nPreferred: B\n", "Preferred", "B"),
        ('Preferred: "B"', "Preferred", "B"),
        ("preferred:   a", "Preferred", "A"),
        ("**Preferred:** B", "Preferred", "B"),
        ("Preferred: <A>.", "Preferred", "A"),
        ("Preferred: Summary B", "Preferred", "B"),
        ("Preferred: A\nOn reflection:\nPreferred: B", "Preferred", "B"),  # the last verdict counts
        ("Comparison: both fine.\nMore helpful: A", "More helpful", "A"),
        ("more  helpful : 'b'", "More helpful", "B"),
        ("More helpful: Response A", "More helpful", "A"),
        # malformed: a tie
        ("", "Preferred", None),
        ("I prefer the first one.", "Preferred", None),
        ('Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">', "Preferred", None),
        ("Preferred: A or B", "Preferred", None),
        ("Preferred: C", "Preferred", None),
        ("Preferred: neither", "Preferred", None),
        ("Preferred: A, because it is shorter", "Preferred", None),
        ("More helpful: A", "Preferred", None),  # the other template's key
        ("Comparison: A is better", "Preferred", None),
    ],
)
def test_parse_verdict(response, key, choice):
    assert judge.parse_verdict(response, key) == choice


def test_llm_judges_ask_both_orders_and_count_ties():
    """A judge that always answers A (pure position bias) ends at 0.5 with no ties; one that answers A to the first
    order and nothing usable to the second scores (1 + 0.5) / 2 with half its verdicts ties."""
    asked = []

    def always_a(text):
        asked.append(text)
        return "Comparison: the first.\nPreferred: A"

    metrics, judgments = judge.win_rate(judge.Judge("t", "local", always_a, "summary"), ["post"], ["mine"], ["ref"])
    assert metrics == {"eval/win_rate": 0.5, "eval/judge_ties": 0.0}
    assert "Summary A:\nmine\n\nSummary B:\nref" in asked[0] and "Summary A:\nref\n\nSummary B:\nmine" in asked[1]
    assert asked[0].startswith(judge.SUMMARY_PROMPT.split("\n")[0]) and "Post:\npost\n" in asked[0]
    assert judgments[0]["choice_policy_first"] == judgments[0]["choice_reference_first"] == "A"

    answers = iter(["More helpful: A", "I cannot decide.", "More helpful: B", "More helpful: A"])
    j = judge.Judge("t", "endpoint", lambda text: next(answers), "chat")
    metrics, judgments = judge.win_rate(j, ["q1", "q2"], ["mine", "mine"], ["ref", "ref"])
    # q1: policy first wins (1), second unparseable (0.5); q2: policy first loses (0), reference first loses (0)
    assert metrics == {"eval/win_rate": (0.75 + 0.0) / 2, "eval/judge_ties": 1 / 4}
    assert [j["outcome"] for j in judgments] == [0.75, 0.0]
    assert judgments[0]["response_reference_first"] == "I cannot decide."
    assert judgments[0]["choice_reference_first"] is None


def test_local_model_judge(tiny_judge):
    j = judge.load_judge(tiny_judge, template="summary", max_new_tokens=4)
    assert j.kind == "local"
    asked, ask = [], j.call
    j.call = lambda text: asked.append(text) or ask(text)
    metrics, judgments = judge.win_rate(j, ["post one", "post two"], ["mine one", "mine two"], ["ref one", "ref two"])
    assert len(asked) == 4  # both orders of both pairs
    assert "Summary A:\nmine one\n\nSummary B:\nref one" in asked[0]
    assert "Summary A:\nref one\n\nSummary B:\nmine one" in asked[1]
    assert all(isinstance(x["response_policy_first"], str) for x in judgments)
    # a random network names neither summary: every verdict is a tie, counted and reported as one
    assert [(x["choice_policy_first"], x["choice_reference_first"]) for x in judgments] == [(None, None)] * 2
    assert metrics == {"eval/win_rate": 0.5, "eval/judge_ties": 1.0}


def write_run(run_dir: Path, with_reference: bool = True) -> Path:
    """A finished run's samples.jsonl: an early evaluation (step 0) and the last one (step 5)."""
    run_dir.mkdir(parents=True)
    rows = [(0, "p1", "x", "aaaa"), (5, "p1", "aaa", "a"), (5, "p2", "b", "bbb"), (5, "p3", "cc", "cc")]
    with open(run_dir / "samples.jsonl", "w") as f:
        for step, p, c, r in rows:
            f.write(
                json.dumps({"step": step, "prompt": p, "completion": c, **({"reference": r} if with_reference else {})})
            )
            f.write("\n")
    return run_dir


def test_cli_on_a_finished_run(fns_dir, tmp_path):
    """`python judge.py RUN --judge module:function`, the module in the working directory."""
    run_dir = write_run(tmp_path / "run")
    cmd = [sys.executable, str(ROOT / "judge.py"), str(run_dir), "--judge", "judge_fns:length"]
    result = subprocess.run(cmd, cwd=fns_dir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "win rate 0.5000 over 3 prompts" in result.stdout
    summary = json.loads((run_dir / "judge.json").read_text())
    assert summary["eval/win_rate"] == 0.5 and summary["eval/judge_ties"] == 1 / 3  # step 5: win, loss, tie
    assert summary["step"] == 5 and summary["judge"] == "judge_fns:length" and summary["judge_kind"] == "pointwise"
    lines = [json.loads(x) for x in (run_dir / "judgments.jsonl").read_text().splitlines()]
    assert [(x["step"], x["prompt"], x["outcome"]) for x in lines] == [(5, "p1", 1.0), (5, "p2", 0.0), (5, "p3", 0.5)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--judge", "judge_fns:length"], "have no `reference` to judge against"),
        (["--judge", "judge_fns:length", "--step", "3"], "--step 3: "),
        (["--judge", "judge_fns:nope"], "has no function 'nope'"),
    ],
)
def test_cli_refuses_in_one_line(fns_dir, tmp_path, monkeypatch, capsys, argv, message):
    run_dir = write_run(tmp_path / "run", with_reference="--step" in argv or "judge_fns:nope" in argv)
    monkeypatch.setattr(sys, "argv", ["judge.py", str(run_dir), *argv])
    with pytest.raises(SystemExit) as e:
        training.run_cli(judge.Args, judge.main)
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (run_dir / "judge.json").exists()


@pytest.fixture(scope="module")
def server(tiny_judge, tmp_path_factory):
    """`transformers serve` (transformers' own OpenAI-compatible server) on a free local port, the tiny model
    preloaded (requests must name it as given), stopped at the end whatever happens. (port, log file)"""
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        pytest.fail("no `transformers` command: pip install -r requirements-test.txt (transformers[serving])")
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [exe, "serve", tiny_judge, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # the access log reaches the file at once
    with open(log, "w") as out:
        # a session of its own: the model runs in a child process, stopped with the server's group
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not healthy after 180 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield port, log
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def test_endpoint_judge_on_a_real_server(server, tiny_judge, tmp_path):
    """The command line judges a run through http://127.0.0.1:PORT/v1: two requests a prompt (both orders, as the
    server's access log shows), every unparseable answer a tie; a model name the server does not serve, or a URL
    without /v1, is one line with the server's reason."""
    port, log = server
    url = f"http://127.0.0.1:{port}/v1"
    run_dir = write_run(tmp_path / "run")
    posts_before = log.read_text().count("POST /v1/chat/completions")
    args = judge.Args(str(run_dir), judge=url, judge_model=tiny_judge, judge_template="chat", max_new_tokens=4)
    summary = judge.main(args)
    assert log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') - posts_before == 6
    assert summary["judge_kind"] == "endpoint" and summary["judge_model"] == tiny_judge
    assert summary["template"] == "chat" and summary["samples"] == 3
    assert summary["eval/win_rate"] == 0.5 and summary["eval/judge_ties"] == 1.0
    assert json.loads((run_dir / "judge.json").read_text()) == summary
    lines = [json.loads(x) for x in (run_dir / "judgments.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["p1", "p2", "p3"]
    for x in lines:
        assert isinstance(x["response_policy_first"], str) and isinstance(x["response_reference_first"], str)
        assert x["choice_policy_first"] is None and x["choice_reference_first"] is None and x["outcome"] == 0.5

    for base, model, message in [(url, "not-served", "HTTP 400"), (url[: -len("/v1")], tiny_judge, "ends in /v1")]:
        wrong = judge.load_judge(base, judge_model=model, max_new_tokens=4)
        with pytest.raises(UserError, match=message) as e:
            judge.win_rate(wrong, ["p"], ["a"], ["b"])
        assert "\n" not in str(e.value)
