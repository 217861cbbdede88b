"""The `trainer` command line: one spec, one command per phase, or `run` for all of them."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from job import __version__
from job.errors import (EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EnvironmentProblem, InputError, SpecError,
                        TrainerError)
from job.report import attach_json_log, console, event, log, register_secrets, setup_logging
from job.spec import LoadedSpec, json_schema, load_spec, redacted_yaml

app = typer.Typer(
    name="trainer",
    help="Fine-tune SANA-Video 2B 480p from one declarative YAML job spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SpecArg = typer.Argument(..., help="Path of the job spec (YAML).", show_default=False)
Verbose = typer.Option(False, "--verbose", "-v", help="Debug logging.")

PHASES = ("preflight", "pull", "cache", "train", "upload")


def _version(value: bool) -> None:
    if value:
        print(f"trainer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    """trainer: fine-tune SANA-Video from a job spec. Exit codes: 0 ok, 1 bug, 2 bad spec/input, 3 environment, 4 remote store."""


def _print_warnings(loaded: LoadedSpec) -> None:
    for warning in loaded.warnings:
        console.print(f"[yellow]warning[/yellow] {escape(str(warning))}")


def _open_job(spec_path: Path, verbose: bool):
    """Load the spec, register its secrets, create the workspace and its event log."""
    from job.workspace import Workspace

    setup_logging(verbose)
    loaded = load_spec(spec_path)
    register_secrets(loaded.secret_values + _environment_secrets())
    _print_warnings(loaded)
    ws = Workspace.for_spec(loaded.spec)
    attach_json_log(ws.events_log)
    use_workspace_compile_cache(ws)
    return loaded, ws


def use_workspace_compile_cache(ws) -> None:
    """Keep torch.compile's kernels (unless TORCHINDUCTOR_CACHE_DIR is set) and the hand-written Triton
    kernels (unless TRITON_CACHE_DIR is set; else ~/.triton) on the workspace volume: the container's
    /tmp and home are gone after a restart, the volume is not. Both are read when a kernel compiles, so
    setting them before any compile is enough."""
    import os

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ws.compile_cache_dir)
    if not os.environ.get("TRITON_CACHE_DIR"):
        os.environ["TRITON_CACHE_DIR"] = str(ws.compile_cache_dir / "triton")


def _environment_secrets() -> list[str]:
    import os

    names = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY")
    return [os.environ[n] for n in names if os.environ.get(n)]


def _run_phases(names: tuple[str, ...], spec_path: Path, verbose: bool, **options) -> None:
    from job.phases import PHASES, StoppedEarly
    from job.report.webhooks import Webhooks

    loaded, ws = _open_job(spec_path, verbose)
    webhooks = Webhooks(loaded.spec.webhooks, job_name=loaded.spec.name)
    options.setdefault("train", {})["webhooks"] = webhooks
    stop_forwarding = webhooks.follow_event_log()  # upload events, some from a background thread

    def announce(name: str, **fields) -> None:
        event(name, **fields)
        webhooks.send(name, fields)

    name = "start"
    try:
        announce("job_started", phases=list(names))
        for name in names:
            announce("phase_changed", phase=name)
            log.info("phase %s", name)
            try:
                PHASES[name](loaded, ws, **options.get(name, {}))
            except StoppedEarly as stop:
                console.print(f"[yellow]stopped[/yellow] {escape(str(stop))}")
                announce("job_finished", phases=list(names), stopped_in=name, message=str(stop))
                return
            event("phase_finished", phase=name)
        announce("job_finished", phases=list(names))
    except TrainerError as exc:
        webhooks.send("job_failed", {"error": str(exc), "exit_code": exc.exit_code})
        raise
    except KeyboardInterrupt as exc:
        exc.phase = getattr(exc, "phase", name)  # for main()'s message
        webhooks.send("job_failed", {"error": _interrupted_message(exc), "exit_code": EXIT_INTERRUPTED})
        raise
    finally:
        stop_forwarding()
        webhooks.close()


@app.command()
def run(spec: Path = SpecArg, verbose: bool = Verbose) -> None:
    """Run the whole job: preflight, pull, cache, train, upload. Every start resumes where the last one stopped."""
    _run_phases(PHASES, spec, verbose)


def _make_phase_command(name: str, summary: str) -> None:
    def command(spec: Path = SpecArg, verbose: bool = Verbose) -> None:
        _run_phases((name,), spec, verbose)

    command.__doc__ = summary
    app.command(name=name)(command)


@app.command()
def cache(spec: Path = SpecArg, verbose: bool = Verbose,
          prune: bool = typer.Option(False, "--prune", help="Delete cache files no current sample uses.")) -> None:
    """Compute text embeddings and VAE latents once (skips what is cached, recomputes what is stale)."""
    _run_phases(("cache",), spec, verbose, cache={"prune": prune})


@app.command()
def preflight(spec: Path = SpecArg, verbose: bool = Verbose,
              json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (for automation)."),
              offline: bool = typer.Option(False, "--offline", help="Skip the reachability checks of remote stores.")) -> None:
    """Check Python, torch, CUDA, GPU, VRAM, RAM, disk and remote stores against the spec, before anything is downloaded."""
    _run_phases(("preflight",), spec, verbose, preflight={"json_output": json_output, "check_remotes": not offline})


for _name, _summary in (
    ("pull", "Fetch the weights and datasets the spec names into the workspace (resumable; skips what is present)."),
    ("train", "Fine-tune the transformer on the cached data (resumes from the latest checkpoint)."),
    ("upload", "Upload checkpoints, validation videos, the final model and its card (only what is missing)."),
):
    _make_phase_command(_name, _summary)


@app.command()
def validate(
    specs: list[Path] = typer.Argument(..., help="One or more spec files.", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only report problems; do not print the resolved spec."),
) -> None:
    """Check spec files and print each resolved spec (secrets redacted) with every problem at once."""
    failed = 0
    for path in specs:
        try:
            loaded = load_spec(path)
        except TrainerError as exc:
            failed += 1
            _print_error(exc, prefix=f"{path}: " if not isinstance(exc, SpecError) else "")
            continue
        if not quiet:
            console.rule(str(path))
            print(redacted_yaml(loaded.spec, loaded.secret_values + _environment_secrets()), end="")
        _print_warnings(loaded)
        console.print(f"[green]ok[/green] {escape(str(path))}")
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
           markdown: bool = typer.Option(False, "--markdown", help="A Markdown reference instead of JSON Schema.")) -> None:
    """Print the JSON Schema of the spec (for editor autocompletion via yaml-language-server), or a Markdown reference."""
    from job.spec.docs import markdown_reference

    text = markdown_reference() if markdown else json.dumps(json_schema(), indent=2) + "\n"
    if output:
        from job.workspace import atomic_write_text

        atomic_write_text(output, text)
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@app.command()
def init(path: Path = typer.Argument(Path("spec.yaml"), help="Where to write the starter spec."),
         force: bool = typer.Option(False, "--force", help="Overwrite an existing file.")) -> None:
    """Write a commented starter spec (the quickstart's 2B 480p job) to edit."""
    from job.spec.starter import STARTER_SPEC
    from job.workspace import atomic_write_text

    if path.exists() and not force:
        raise InputError(f"{path} already exists", "pass --force to overwrite it, or choose another path")
    atomic_write_text(path, STARTER_SPEC)
    console.print(f"wrote {path}; check it with: trainer validate {path}")


@app.command()
def smoke(workspace: Path = typer.Option(Path("workspace-smoke"), "--workspace", "-w", help="Folder for the tiny model, clips and outputs."),
          fresh: bool = typer.Option(False, "--fresh", help="Delete the folder first."),
          verbose: bool = Verbose) -> None:
    """Generate a tiny random SANA-Video model and synthetic clips, then run every phase on them (CPU, about a minute)."""
    import os

    from job.smoke import prepare_smoke_workspace
    from job.spec.starter import SMOKE_SPEC_PATH

    material = prepare_smoke_workspace(workspace, fresh=fresh)
    os.environ["TRAINER_WORKSPACE"] = str(material.workspace)
    _run_phases(PHASES, Path(str(SMOKE_SPEC_PATH)), verbose)
    output = material.workspace / "output"
    expected = [output / "final" / "transformer" / "config.json", output / "validation" / "index.html"]
    missing = [str(p) for p in expected if not p.exists()]
    if missing:
        raise EnvironmentProblem(f"the smoke job finished without {', '.join(missing)}", "run `trainer smoke --fresh -v` and report the log")
    console.print(f"[green]smoke test passed[/green]: outputs in {material.workspace / 'output'}")


@app.command("import-simpletuner")
def import_simpletuner(
    config: Path = typer.Argument(..., help="SimpleTuner config.json.", show_default=False),
    backend: Optional[Path] = typer.Argument(None, help="SimpleTuner multidatabackend.json (default: the config's data_backend_config)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the spec here instead of stdout."),
) -> None:
    """Turn a SimpleTuner config.json (+ multidatabackend.json) into a job spec; unsupported keys are reported by name."""
    from job.spec.simpletuner import convert_files
    from job.workspace import atomic_write_text

    text, unsupported = convert_files(config, backend)
    for key, why in unsupported:
        console.print(f"[yellow]not imported[/yellow] {escape(key)}: {escape(why)}")
    if output:
        atomic_write_text(output, text)
        console.print(f"wrote {output}; check it with: trainer validate {output}")
    else:
        sys.stdout.write(text)


def _print_error(exc: TrainerError, prefix: str = "") -> None:
    console.print(f"[bold red]error[/bold red] {escape(prefix + str(exc))}")


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the train phase (`docker stop`, a preempted machine), raised where the job is, so it
    leaves through every `finally` as after Ctrl-C. The train phase handles both signals itself (a
    checkpoint, then exit 0) and puts this handler back when it ends."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def _in_chain(exc: BaseException | None, matches) -> BaseException | None:
    """The first exception in `exc`'s chain (itself, its cause or context, and so on) that `matches`:
    libraries wrap what happened in their own errors."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if matches(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _failed(exc: TrainerError) -> int:
    """One message, the job_failed event, the documented exit code."""
    _print_error(exc)
    event("job_failed", error=str(exc), exit_code=exc.exit_code)
    return exc.exit_code


def _interrupted(exc: KeyboardInterrupt) -> int:
    message = _interrupted_message(exc)
    console.print(f"[yellow]{escape(message)}[/yellow]: what finished is kept; run the same command again to continue")
    event("job_failed", error=message, exit_code=EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


def _interrupted_message(exc: KeyboardInterrupt) -> str:
    name = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name  # a plain KeyboardInterrupt is Ctrl-C
    phase = getattr(exc, "phase", None)
    return f"interrupted by {name}" + (f" during the {phase} phase" if phase else "")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user mistakes end in one message and a documented exit code, bugs in a traceback and 1."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:  # None: a handler set outside Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(argv: list[str] | None) -> int:
    try:
        # Standalone mode: usage errors print their help and exit 2 through SystemExit.
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        interrupt = _in_chain(exc, lambda e: isinstance(e, KeyboardInterrupt))  # typer turns Ctrl-C / SIGTERM inside a command into exit 130
        if interrupt is not None:
            return _interrupted(interrupt)
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_BAD_INPUT)
    except TrainerError as exc:
        return _failed(exc)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:
        if _disk_full(exc):  # any phase, any library (torch, safetensors, PyAV): a full disk is no bug
            return _failed(EnvironmentProblem(f"the disk is full: {exc}",
                                              "free space on the workspace volume (or give it a larger one), then run the "
                                              "same command again: it resumes from what was written, the last checkpoint"))
        refused = _path_refused(exc)
        if refused is not None:  # a read-only volume, a folder without permission, a file where a folder goes
            return _failed(EnvironmentProblem(f"cannot write or open {refused.filename}: {refused.strerror}",
                                              "mount the workspace volume writable and check the folder's owner and "
                                              "permissions, or point `workspace` / `output.dir` in the spec at a folder "
                                              "this user can write"))
        console.print_exception()  # a bug in trainer: show everything
        return EXIT_BUG
    return EXIT_OK


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception chain (some libraries say it only in text)."""
    import errno

    return _in_chain(exc, lambda e: (isinstance(e, OSError) and e.errno == errno.ENOSPC)
                     or "No space left on device" in str(e)) is not None


def _path_refused(exc: BaseException | None) -> OSError | None:
    """The OSError in the exception chain that says the file system refused a path, if any."""
    import errno

    refusals = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
    return _in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in refusals and bool(e.filename))


if __name__ == "__main__":
    sys.exit(main())
