"""The plumbing of a training run, none of it algorithm logic: the command line and its one-line errors, the run
directory (args.json, TensorBoard, metrics.jsonl, samples.jsonl, eval.json, wandb), checkpoints and --resume."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import typing
from pathlib import Path

import torch
from accelerate import Accelerator

TRUST_REMOTE_CODE = False  # set by common.setup() from --trust-remote-code


class UserError(Exception):
    """A mistake in the input (arguments, data, paths): reported as one line, exit code 2."""


class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss or reward): reported as one line, exit code 1."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was saved at the end of the update; exit code 130."""


RESUME_MAY_CHANGE = ("resume", "save_every", "track", "wandb_project")  # change neither the data nor the result


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag may take, declared in its type (`batch_size: Positive[int] = 64`) and checked by
    `check_args` before anything uses them. NaN and infinities are never in range."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False  # > low rather than >= low
    open_high: bool = False

    def __getitem__(self, tp):  # Positive[int] is typing.Annotated[int, Positive]: tyro parses an int
        return typing.Annotated[tp, self]

    def __contains__(self, v) -> bool:
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            return False
        return (v > self.low if self.open_low else v >= self.low) and (
            v < self.high if self.open_high else v <= self.high
        )

    def __str__(self) -> str:
        if self.high == math.inf:
            return "finite" if self.low == -math.inf else f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


Positive, NonNegative, Fraction, Finite = Range(0, open_low=True), Range(0), Range(0, 1), Range()


def declared_ranges(tp) -> list[Range]:
    """The Ranges a field's type declares, through `| None` and `tuple[...]` (each element is checked)."""
    if typing.get_origin(tp) is typing.Annotated:
        return [m for m in tp.__metadata__ if isinstance(m, Range)]
    return [r for arg in typing.get_args(tp) for r in declared_ranges(arg)]


def check_args(args):
    """A one-line error for the first flag outside the range its type declares; None stands for "not set"."""
    if not dataclasses.is_dataclass(args):  # not a script's Args
        return
    hints = typing.get_type_hints(type(args), include_extras=True)
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        for allowed in declared_ranges(hints[field.name]):
            if any(v is not None and v not in allowed for v in (value if isinstance(value, tuple) else (value,))):
                shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
                raise UserError(f"--{field.name.replace('_', '-')} {shown} must be {allowed}")


def load_function(spec: str, flag: str):
    """`module:function` (a module on the import path, or a .py file) -> the function, for `flag` (--reward-fn)."""
    module_name, _, name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):  # a file: imported under its own name, from where it is
            location = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(location)
            location.loader.exec_module(module)
        else:  # `python script.py` puts the script's folder on the path, not the working directory
            sys.path += [] if os.getcwd() in sys.path else [os.getcwd()]
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError, SyntaxError) as e:
        raise UserError(f"{flag} {spec}: cannot import {module_name!r} ({e})") from None
    if not callable(getattr(module, name, None)):
        raise UserError(f"{flag} {spec}: {module_name!r} has no function {name!r} (the form is module:function)")
    return getattr(module, name)


def preset(args_cls, presets: dict | None, argv: list[str]):
    """The Args whose defaults the dataset's entry in `presets` sets (a task's judge, models and lengths): a flag
    given still wins, and `--dataset NAME --help` shows the preset's values. None where there is no entry."""
    name = args_cls().dataset if presets else None  # the default dataset's preset unless --dataset names another
    for i, arg in enumerate(argv):
        name = arg.removeprefix("--dataset=") if arg.startswith("--dataset=") else name
        name = argv[i + 1] if arg == "--dataset" and i + 1 < len(argv) else name
    return args_cls(dataset=name, **presets[name]) if name in (presets or {}) else None


def run_cli(args_cls, main, presets: dict | None = None):
    """main(tyro.cli(Args)) with input mistakes and stopped runs as one line and a non-zero exit code; `presets`:
    `preset`'s defaults. With --resume, the arguments are the run's args.json."""
    import tyro

    try:
        args = tyro.cli(args_cls, default=preset(args_cls, presets, sys.argv[1:]))
        if getattr(args, "track", False) and importlib.util.find_spec("wandb") is None:  # before anything is written
            raise UserError("--track needs wandb: pip install wandb")
        main(resume_args(args_cls, args) if getattr(args, "resume", None) else args)
    except (UserError, TrainingError, Interrupted) as e:
        quiet = isinstance(e, UserError) and int(os.environ.get("RANK", "0")) > 0  # every process meets an input
        if not quiet:  # mistake alike: the first one says it
            print(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {e}", file=sys.stderr)
        sys.exit({UserError: 2, TrainingError: 1, Interrupted: 130}[type(e)])


def resume_args(args_cls, args):
    """The saved arguments of the run in `args.resume`. One given on the command line must equal the saved one
    (a resumed run is the same run), except RESUME_MAY_CHANGE."""
    run_dir = Path(args.resume)
    if not (run_dir / "args.json").is_file():
        raise UserError(f"--resume {args.resume}: not a run directory (no args.json)")
    try:
        saved = json.loads((run_dir / "args.json").read_text())
    except ValueError:
        raise UserError(f"--resume {args.resume}: args.json is not valid JSON") from None
    fields = {f.name for f in dataclasses.fields(args_cls)}
    if set(saved) != fields:
        raise UserError(f"--resume {args.resume}: a run of another script (arguments {sorted(set(saved) ^ fields)})")
    defaults = args_cls()
    for name in sorted(fields - set(RESUME_MAY_CHANGE) - {"output_dir", "run_name"}):
        given = getattr(args, name)
        if given != getattr(defaults, name) and json.loads(json.dumps(given, default=str)) != saved[name]:
            flag = f"--{name.replace('_', '-')}"
            raise UserError(f"--resume: {flag} {given} differs from the run's {saved[name]} (a resumed run keeps it)")
    keep = {name: getattr(args, name) for name in RESUME_MAY_CHANGE if name in fields}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}  # JSON has no tuples
    return dataclasses.replace(args_cls(**saved), **keep, output_dir=str(run_dir.parent), run_name=run_dir.name)


class Run:
    """runs/<run_name>/: args.json, TensorBoard events, metrics.jsonl, samples.jsonl, checkpoint/ and, at the end,
    eval.json. Only the main process writes; metrics are averaged over processes. A new run refuses a directory
    that holds one; --resume cuts the logs back to the checkpoint's update. Ctrl-C / SIGTERM: `step_done` saves a
    checkpoint and raises Interrupted (a second one stops at once)."""

    def __init__(self, args, accelerator: Accelerator, total: int):
        self.accelerator, self.args, self.start = accelerator, args, time.time()
        name = args.run_name or f"{args.exp_name}__{args.seed}__{int(self.start)}"
        self.dir, self.main = Path(args.output_dir) / name, accelerator.is_main_process
        self.accelerators, self.models, self.stop_signal, self.closed, step = [accelerator], [], None, False, None
        if getattr(args, "resume", None):
            if (self.dir / "eval.json").exists():
                raise UserError(f"--resume {self.dir}: the run has finished (eval.json exists)")
            step, self.resume_from = find_checkpoint(self.dir)
        elif (self.dir / "args.json").exists():
            raise UserError(f"{self.dir} already holds a run: continue it with --resume {self.dir} or a new --run-name")
        accelerator.wait_for_everyone()  # every process has checked before the main one writes
        if self.main and args.track:  # before the directory: a failed start (no login, no network) leaves nothing
            try:
                import wandb

                config = dict(project=args.wandb_project, name=name, id=name, config=dataclasses.asdict(args))
                wandb.init(**config, sync_tensorboard=True, resume="allow")
            except Exception as e:
                detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UserError(f"--track: wandb did not start ({detail}); `wandb login`, or no --track") from None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            self.dir.mkdir(parents=True, exist_ok=True)
            if step is None:
                (self.dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str))
            for log in ("metrics.jsonl", "samples.jsonl") if step is not None else ():
                cut_log(self.dir / log, step)
            self.writer = SummaryWriter(str(self.dir), purge_step=None if step is None else step + 1)
            interval = 1 if sys.stdout.isatty() else 10
            self.bar = tqdm(total=total, initial=step or 0, desc=args.exp_name, file=sys.stdout, mininterval=interval)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None or self.closed:  # the second one (or a finished run): stop now
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        print(f"\n[run] {self.stop_signal}: checkpoint at the end of this update (again: stop now)", file=sys.stderr)

    def log(self, metrics: dict, update: int, show: tuple[str, ...] = ()) -> dict:
        """Average over processes, write to TensorBoard and metrics.jsonl, show `show` on the progress bar."""
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.accelerator.num_processes > 1:
            keys = sorted(metrics)
            values = torch.tensor([metrics[k] for k in keys], device=self.accelerator.device)
            metrics = dict(zip(keys, self.accelerator.reduce(values, "mean").tolist()))
        if self.main:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, update)
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": update, **metrics}) + "\n")
            self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in show if k in metrics}, refresh=False)
        return metrics

    def log_eval(self, update: int, metrics: dict, samples: list[dict]) -> dict:
        """An evaluation's metrics logged, its samples appended to samples.jsonl and the first four printed."""
        if self.main:
            with open(self.dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps({"step": update, **s}) + "\n" for s in samples)
            print(f"\n--- samples at update {update} ---")
            for s in samples[:4]:
                scores = "  ".join(f"{k}={v:.3f}" for k, v in s.items() if isinstance(v, float))
                prompt = s["prompt"].replace("\n", "\\n")[-70:]  # real prompts have line breaks (TL;DR, HH, chat)
                print(f"{prompt:>70} | {s['completion']!r:<28} {scores}")
        return self.log(metrics, update, show=("eval/win_rate", "eval/score", "eval/kl"))

    def resume(self, *accelerators, **objects) -> dict | None:
        """Name what a checkpoint holds beyond what accelerator.prepare returned (models, optimizers: DeepSpeed
        engines save their own, sharded, checkpoints): objects with a state_dict (the scheduler) and any other
        Accelerator. With --resume, load them with every process's RNG states and return the loop state this
        process saved; else None."""
        self.accelerators = [self.accelerator, *accelerators]
        for obj in objects.values():
            self.accelerator.register_for_checkpointing(obj)
        self.models = [m for acc in self.accelerators for m in acc._models]
        if not getattr(self.args, "resume", None):
            return None
        try:
            for i, acc in enumerate(self.accelerators):
                acc.load_state(str(self.resume_from / f"accelerator_{i}"))
            state = torch.load(self.resume_from / f"state_{self.accelerator.process_index}.pt", weights_only=True)
        except Exception as e:  # a truncated or hand-edited checkpoint: say which, never a traceback
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--resume {self.dir}: corrupt checkpoint ({detail})") from None
        print(f"[run] resumed {self.dir} at update {state['step']}")
        return state

    def step_done(self, update: int, state: dict):
        """End of an update: advance the bar; save a checkpoint holding `state` (the loop's position: plain data
        and tensors) when --save-every says so or a stop was asked for, and then raise Interrupted."""
        if self.main:
            self.bar.update(1)
        stop = torch.tensor([float(self.stop_signal is not None)], device=self.accelerator.device)
        stop = bool(self.accelerator.reduce(stop, "max").item())  # every process stops at the same update
        every = getattr(self.args, "save_every", 0)
        if stop or (every and update % every == 0):
            self.save_checkpoint(update, state)
        if stop:
            self.close()
            raise Interrupted(f"at update {update}, checkpoint saved; continue with --resume {self.dir}")

    def save_checkpoint(self, update: int, state: dict):
        """checkpoint/ written atomically: accelerator.save_state (models, optimizers, scheduler, RNG states) and
        each process's loop state go into checkpoint.tmp/, swapped in by renames, so a crash at any moment leaves
        the previous checkpoint (or checkpoint.old/ during the swap) complete."""
        for model in self.models:  # local shards under ZeRO-3: each process checks its own
            if not all(p.isfinite().all() for p in model.parameters()):
                raise TrainingError(f"non-finite weights at update {update}: no checkpoint; {self.last_checkpoint()}")
        tmp, old, ckpt = self.dir / "checkpoint.tmp", self.dir / "checkpoint.old", self.dir / "checkpoint"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        for i, acc in enumerate(self.accelerators):
            acc.save_state(str(tmp / f"accelerator_{i}"))
        torch.save({**state, "step": update}, tmp / f"state_{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if self.main:
            (tmp / "meta.json").write_text(json.dumps({"step": update, "processes": self.accelerator.num_processes}))
            if old.exists() and not ckpt.exists():  # a crash during the last swap: old/ is the good one
                old.rename(ckpt)
            shutil.rmtree(old, ignore_errors=True)
            if ckpt.exists():
                ckpt.rename(old)
            tmp.rename(ckpt)  # from here on the new checkpoint is the one
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def last_checkpoint(self) -> str:
        try:
            return "last good checkpoint: {1} (update {0})".format(*find_checkpoint(self.dir))
        except UserError:
            return "no checkpoint (--save-every N writes them)"

    def check_finite(self, update: int, **values):
        """Stop the run when a loss or reward is NaN or infinite, before it reaches the weights."""
        for name, value in values.items():
            if not torch.isfinite(torch.as_tensor(value)).all():
                raise TrainingError(
                    f"non-finite {name} at update {update}: stopped before the weights changed; "
                    f"{self.last_checkpoint()}"
                )

    def close(self):
        self.closed = True
        if self.main:
            self.bar.close()
            self.writer.close()

    def finish(self, final: dict, initial: dict | None = None, times: dict | None = None):
        """eval.json: the last evaluation, the first one as initial/*, wall time, the last update's time and the
        peak memory; printed as one line."""
        summary = {
            **{f"initial/{k.removeprefix('eval/')}": v for k, v in (initial or {}).items()},
            **final,
            "time/total": time.time() - self.start,
            "memory/peak_mb": peak_memory_mb(),
        }
        if times:
            summary["time/update_last"] = sum(times.values())
            print(f"[{self.args.exp_name}] last update: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
        self.accelerator.wait_for_everyone()
        if self.main:
            (self.dir / "eval.json").write_text(json.dumps(summary, indent=2))
            self.close()
            print(f"[run] {self.dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        self.accelerator.end_training()


def find_checkpoint(run_dir: Path) -> tuple[int, Path]:
    """(update, directory) of the run's complete checkpoint: checkpoint/, or checkpoint.old/ when a crash hit the
    swap of a new one."""
    for d in (run_dir / "checkpoint", run_dir / "checkpoint.old"):
        if d.is_dir():
            try:
                return json.loads((d / "meta.json").read_text())["step"], d
            except (OSError, ValueError, KeyError):
                raise UserError(f"--resume {run_dir}: corrupt checkpoint (no readable {d.name}/meta.json)") from None
    raise UserError(f"--resume {run_dir}: no checkpoint (write them with --save-every N; Ctrl-C writes one)")


def cut_log(path: Path, update: int):
    """Keep the lines of a jsonl log up to `update`: a resumed run writes the later ones again."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if line.strip() and json.loads(line)["step"] <= update))


@contextlib.contextmanager
def timer(times: dict, key: str):
    """Add the wall time of the block to times[key] (seconds)."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start


def peak_memory_mb() -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPU, the peak resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
