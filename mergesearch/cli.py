"""Command-line interface: thin commands that parse, call the library and print.

User errors (:class:`MergeSearchError`) are printed as one line on stderr with a non-zero exit; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from mergesearch.errors import ConfigError, MergeSearchError

# plain click help: rich's help panels print a type column (``<bool>`` next to every flag) and fold options
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Multi-objective search over merge recipes for fine-tuned transformer models.")


JOB_HELP = "The job YAML: its storage and study (else run's defaults). --storage/--study override it."
STORAGE_HELP = "Storage URL, or a SQLite file path (default: the job's, else sqlite:///<study>.db)."


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mergesearch {version('mergesearch')}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors (anywhere on the line)."),
    _show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
) -> None:
    # --debug is taken out of the line by main() (so it may follow the subcommand); declared here for --help
    import optuna

    # our own lines say what happened to the study; optuna's INFO lines would repeat them
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@app.command()
def merge(
    config: Path = typer.Argument(..., help="A mergekit-style YAML config."),
    out_dir: Path = typer.Argument(..., help="Output Hugging Face model directory."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading pickle .bin checkpoints."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    device: str = typer.Option("cpu", help="Device to merge on (cpu, cuda, cuda:1)."),
) -> None:
    """Merge models as a mergekit YAML config says and write a Hugging Face model directory."""
    from mergesearch.merging.run import merge_config

    out = merge_config(config, out_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       overwrite=overwrite, device=device)
    typer.echo(f"wrote {out}")


def _with_execution(config, workers: int | None, address: str | None, executor: str | None):
    """The config with CLI overrides of its execution section."""
    from pydantic import ValidationError

    from mergesearch.config import ExecutionConfig, format_validation_error
    from mergesearch.errors import ConfigError

    if executor == "local" and (address is not None or (workers or 1) > 1):
        flag = "--address" if address is not None else "--workers"
        raise ConfigError(f"conflicting options: {flag} needs --executor ray (got --executor local)")
    upd = {k: v for k, v in {"workers": workers, "address": address, "executor": executor}.items() if v is not None}
    if address is not None and executor is None:
        upd["executor"] = "ray"
    if not upd:
        return config
    try:
        execution = ExecutionConfig.model_validate({**config.execution.model_dump(), **upd})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "command line").replace("execution.", "--")) from None
    return config.model_copy(update={"execution": execution})


def _echo_baseline(name: str) -> None:
    typer.echo(f"reference row scored: {name}", err=True)


def _run_search(config, *, storage, study, trials, optimizer, seed, workers, address, executor,
                progress: bool, new_study: str | None = None) -> None:
    from mergesearch.search.loop import SearchRun, make_executor
    from mergesearch.search.pareto import load_front, render_table
    from mergesearch.search.progress import RunProgress
    from mergesearch.search.study import mask_url

    config = _with_execution(config, workers, address, executor)
    run = SearchRun(config, storage=storage, study_name=study or new_study, trials=trials, optimizer=optimizer,
                    seed=seed, new_study=new_study is not None)
    done = run.completed_count()
    if done < run.target and not run.budget_spent():
        try:
            # the lease first: a second driver is refused at once, not after loading its models too. Workers
            # start (and check the models) before anything else is written: a bad model leaves an existing study
            # as it was (abandon gives the lease back), a study this run created is removed again
            run.take_lease()
            pool = make_executor(config)
            try:
                run.prepare()
                typer.echo(f"study '{run.study_name}' in {mask_url(run.storage)}: {done}/{run.target} trials "
                           "complete" + (f", {run.recovered} orphaned trial(s) re-queued" if run.recovered else ""),
                           err=True)
                if progress:
                    with RunProgress(run) as bar:
                        report = run.run(pool, on_result=bar, on_baseline=_echo_baseline)
                else:
                    report = run.run(pool, on_baseline=_echo_baseline)
            finally:
                pool.close()
        except BaseException:
            run.abandon()
            raise
        if report.interrupted:
            run.abandon()
        status = "interrupted; run the same command to resume" if report.interrupted else "done"
        if report.terminated:
            status = "terminated (SIGTERM); run the same command to resume"
        pruned = f", {report.pruned_this_run} pruned" if config.search.fidelity is not None else ""
        budget = config.search.max_examples
        examples = f"; {report.examples}{f'/{budget}' if budget else ''} examples scored" if report.examples else ""
        typer.echo(f"{status}: {report.completed_this_run} completed{pruned}, {report.failed_this_run} failed in "
                   f"{report.elapsed:.1f}s{examples}", err=True)
        if report.interrupted:
            from mergesearch.execution.stop import EXIT_TERMINATED

            raise typer.Exit(EXIT_TERMINATED if report.terminated else 130)
    else:
        why = (f"{run.examples} examples scored, search.max_examples is {config.search.max_examples}"
               if run.budget_spent() else "--trials raises the target")
        typer.echo(f"study '{run.study_name}' in {mask_url(run.storage)}: {done}/{run.target} trials complete; "
                   f"nothing to run ({why})", err=True)
    typer.echo(render_table(load_front(run.study)))


@app.command()
def run(
    config: Path = typer.Argument(..., help="Job YAML (models, space, objectives, search, execution)."),
    storage: str | None = typer.Option(None, help=STORAGE_HELP),
    study: str | None = typer.Option(None, help="Study name (resumed if it exists)."),
    trials: int | None = typer.Option(None, min=1, help="Target number of completed trials in the study."),
    optimizer: str | None = typer.Option(None, help="Optimizer backend (overrides the config)."),
    seed: int | None = typer.Option(None, help="Seed (overrides the config)."),
    workers: int | None = typer.Option(None, min=1, help="Number of workers."),
    address: str | None = typer.Option(None, help="Ray cluster address (auto, HOST:PORT, ray://...)."),
    executor: str | None = typer.Option(None, help="local (in-process) or ray."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    new_study: str | None = typer.Option(None, "--new-study", metavar="NAME",
                                         help="Start a new study NAME (refused if it exists)."),
) -> None:
    """Run (or resume) a multi-objective merge search and print the Pareto front."""
    from mergesearch.config import load_config

    if new_study is not None and study is not None:
        from mergesearch.errors import ConfigError

        raise ConfigError("conflicting options: --study and --new-study (give one)")
    _run_search(load_config(config), storage=storage, study=study, trials=trials, optimizer=optimizer, seed=seed,
                workers=workers, address=address, executor=executor, progress=progress, new_study=new_study)


@app.command("demo-models")
def demo_models(
    out: Path = typer.Argument(Path("mergesearch-demo"), help="Folder for the base, experts and data."),
    seed: int = typer.Option(0, help="Seed of the data and training."),
    fast: bool = typer.Option(False, help="The smaller variant used by the tests."),
    non_local: bool = typer.Option(False, "--non-local",
                                   help="Also experts far from the base (each one's units permuted), with a job "
                                        "that searches alignment."),
) -> None:
    """Build the tiny demo base model and experts (cached)."""
    say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    if non_local:
        from mergesearch.demo.non_local import build_non_local

        built = build_non_local(out, seed=seed, fast=fast, progress=say)
        typer.echo(f"non-local demo models in {built['root']}; job: {built['config']}")
        return
    from mergesearch.demo.build import build_demo

    paths = build_demo(out, seed=seed, fast=fast, progress=say)
    typer.echo(f"demo models in {paths.root}")


@app.command()
def demo(
    trials: int = typer.Option(40, min=1, help="Completed trials to reach."),
    workers: int = typer.Option(2, min=1, help="Ray workers (local processes)."),
    out: Path = typer.Option(Path("mergesearch-demo"), help="Folder for models, data and the study."),
    optimizer: str | None = typer.Option(None, help="Optimizer backend (default from the demo config)."),
    seed: int = typer.Option(0, help="Seed of the models and the search."),
    executor: str | None = typer.Option(None, help="local (in-process) or ray (default)."),
    fast: bool = typer.Option(False, "--fast", hidden=True, help="The smaller demo variant used by the tests."),
) -> None:
    """Build the demo experts if absent, search merges of them, and print the Pareto front."""
    from mergesearch.config import load_config
    from mergesearch.demo.build import build_demo, write_demo_config

    build_demo(out, seed=seed, fast=fast, progress=lambda msg: typer.echo(msg, err=True))
    config = load_config(write_demo_config(out, trials=trials))
    storage = f"sqlite:///{(out / 'demo.db').resolve()}"
    _run_search(config, storage=storage, study="demo", trials=trials, optimizer=optimizer, seed=seed,
                workers=workers, address=None, executor=executor, progress=True)
    from mergesearch.demo.summary import recipe_values, summary
    from mergesearch.search.pareto import load_front, open_existing_study
    from mergesearch.search.plots import plot_front

    front_ = load_front(storage, "demo")
    png = plot_front(front_, None, out / "front.png", picked=_knee(front_))
    typer.echo("")
    for line in summary(front_, recipe_values(open_existing_study(storage, "demo"), front_.names)):
        typer.echo(line)
    typer.echo(f"Plot of the front: {png}. Inspect a trial: mergesearch show {out / 'demo.yaml'} --trial N "
               f"--storage {out / 'demo.db'} --study demo")


@app.command("eval")
def eval_(
    config: Path = typer.Argument(..., help="Job YAML whose objectives are evaluated."),
    model: str = typer.Option(..., help="Model directory (or hub id) to evaluate."),
    split: str = typer.Option("search", help="search (data) or test (held-out files)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {objective: value}."),
    device: str = typer.Option("cpu", help="Device."),
) -> None:
    """Evaluate a Hugging Face model directory on a config's objectives."""
    import json

    from mergesearch.config import load_config
    from mergesearch.objectives import evaluate_model_dir

    if split not in ("search", "test"):
        from mergesearch.errors import ConfigError

        raise ConfigError(f"--split: expected search or test, got '{split}'")
    cfg = load_config(config)
    scores = evaluate_model_dir(model, cfg.objectives, split=split, base_model=cfg.base_model, device=device)
    if as_json:
        typer.echo(json.dumps(scores))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("objective", "value", title=f"{model} ({split})")
    for k, v in scores.items():
        table.add_row(k, f"{v:.4f}")
    Console().print(table)


def _study_ref(job: Path | None, storage: str | None, study: str | None) -> tuple[str, str | None]:
    """``(storage URL, study name)`` from the job YAML and/or the options, with ``run``'s defaults.

    With only ``--storage``, the name is None: a storage holding one study needs none.
    """
    from mergesearch.search.study import storage_url, study_location

    if job is None and storage is None and study is None:
        from mergesearch.errors import ConfigError

        raise ConfigError("name a study: give the job YAML, or --storage URL [--study NAME]")
    if job is None and study is None:
        return storage_url(storage), None
    config = None
    if job is not None:
        from mergesearch.config import load_config

        config = load_config(job)
    return study_location(config, storage, study)


@app.command()
def studies(
    job: Path | None = typer.Argument(None, metavar="[JOB.yaml]", help="A job YAML whose storage is listed.",
                                      show_default=False),
    storage: str | None = typer.Option(None, help=STORAGE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the studies in a storage with their trial counts and objectives."""
    import json

    from mergesearch.search.study import list_studies, mask_url

    url, _ = _study_ref(job, storage, None) if job is not None or storage is not None else (None, None)
    if url is None:
        from mergesearch.errors import ConfigError

        raise ConfigError("name a storage: give the job YAML or --storage URL")
    found = list_studies(url)
    if as_json:
        typer.echo(json.dumps(found))
        return
    if not found:
        typer.echo(f"no studies in {mask_url(url)}")
        return
    arrow = {"maximize": "↑", "minimize": "↓"}
    typer.echo(f"{len(found)} stud{'y' if len(found) == 1 else 'ies'} in {mask_url(url)}:")
    for st in found:
        c = st["counts"]
        objs = ", ".join(f"{n} {arrow.get(d, d)}" for n, d in st["objectives"])
        extra = "".join(f", {c[k]} {k}" for k in ("failed", "running", "waiting") if c[k])
        typer.echo(f"  {st['name']}: {c['complete']} complete of {c['total']} trials{extra}; objectives: {objs}")


@app.command()
def front(
    job: Path | None = typer.Argument(None, metavar="[JOB.yaml]", help=JOB_HELP, show_default=False),
    storage: str | None = typer.Option(None, help=STORAGE_HELP),
    study: str | None = typer.Option(None, help="Study name."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    plot: Path | None = typer.Option(None, help="Write a plot (.png or .html); the knee trial is annotated."),
    plot_history: Path | None = typer.Option(None, "--plot-history", help="Write the hypervolume over trials "
                                             "(.png or .html)."),
    test: bool = typer.Option(False, "--test", help="Re-score the front on the held-out test split."),
) -> None:
    """Show the Pareto front of a study (optionally re-checked on the test split)."""
    import json

    from mergesearch.search.pareto import front_to_csv, front_to_json, load_front, render_table

    if fmt not in ("table", "json", "csv"):
        from mergesearch.errors import ConfigError

        raise ConfigError(f"--format: expected table, json or csv, got '{fmt}'")
    storage, study = _study_ref(job, storage, study)
    result = load_front(storage, study)
    if test:
        from mergesearch.exporting import validate_front

        result = validate_front(storage, study, result, progress=lambda msg: typer.echo(msg, err=True))
    if plot is not None:
        from mergesearch.search.plots import plot_front

        plot_front(result, None, plot, picked=_knee(result))
        typer.echo(f"plot written to {plot}", err=True)
    if plot_history is not None:
        from mergesearch.search.pareto import hypervolume_history, hypervolume_text, open_existing_study
        from mergesearch.search.plots import plot_hypervolume_history

        norm = result.normalised_hypervolume is not None
        history = hypervolume_history(open_existing_study(storage, study), normalised=norm)
        where = hypervolume_text(result).split(" (", 1)[1].rstrip(")")  # the reference point and its source
        plot_hypervolume_history({result.study_name: history}, plot_history,
                                 ylabel="hypervolume" + (" (normalised)" if norm else ""),
                                 title=f"study {result.study_name}: hypervolume vs completed trials\n{where}")
        typer.echo(f"hypervolume history written to {plot_history}", err=True)
    if fmt == "json":
        typer.echo(json.dumps(front_to_json(result)))
    elif fmt == "csv":
        typer.echo(front_to_csv(result), nl=False)
    else:
        typer.echo(render_table(result))


def _knee(front) -> tuple[int, str] | None:
    """``(trial, "knee")`` of the front's knee point, to annotate plots; None for a front of one trial."""
    if len(front.trials) < 2:
        return None
    from mergesearch.search.preference import pick as do_pick

    try:
        return do_pick(front, None, method="knee").trial.number, "knee"
    except MergeSearchError:
        return None


@app.command()
def show(
    job: Path | None = typer.Argument(None, metavar="[JOB.yaml]", help=JOB_HELP, show_default=False),
    trial: int = typer.Option(..., "--trial", min=0, help="Trial number."),
    storage: str | None = typer.Option(None, help=STORAGE_HELP),
    study: str | None = typer.Option(None, help="Study name."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show one trial: its scores, parameters by model, recipe (YAML) and state or failure reason."""
    import json

    from mergesearch.exporting import describe_trial
    from mergesearch.search.pareto import open_existing_study

    storage, study = _study_ref(job, storage, study)
    info = describe_trial(open_existing_study(storage, study), trial)
    if as_json:
        typer.echo(json.dumps(info.to_json()))
        return
    state = info.state + (f": {info.fail_reason}" if info.fail_reason else "")
    typer.echo(f"trial {info.number} of study '{info.study}': {state}" + (f" ({info.origin})" if info.origin else ""))
    if info.values is not None:
        typer.echo("scores: " + "  ".join(f"{k}={v:.6g}" for k, v in info.values.items()))
    for k, rung in enumerate(info.details.get("rungs") or ()):  # fidelity rungs: partial scores, in order
        typer.echo(f"rung {k + 1} ({rung['n']} examples per task): "
                   + "  ".join(f"{name}={v:.6g}" for name, v in rung["values"].items()))
    if info.details.get("examples"):
        typer.echo(f"examples scored: {info.details['examples']}")
    if info.summary:
        typer.echo(f"summary: {info.summary}")
    if info.params:
        typer.echo("params:")
        for k, v in info.params.items():
            typer.echo(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    recipe = info.recipe_yaml()
    typer.echo("recipe:" if recipe else "recipe: none yet (not evaluated)")
    if recipe:
        typer.echo("".join(f"  {line}\n" for line in recipe.splitlines()), nl=False)
    d = info.details
    if d:
        timing = " ".join(f"{k}={v:.2f}s" for k, v in (d.get("timings") or {}).items())
        typer.echo(f"worker: {d.get('worker', '?')}, attempts: {d.get('attempts', '?')}"
                   + (f", timings: {timing}" if timing else ""))


@app.command()
def suggest(
    job: Path = typer.Argument(..., metavar="JOB.yaml", help="The job of the study (a layer space, optimizer hm3)."),
    prefer: str = typer.Option(..., help="Weights over objectives, e.g. reverse=2,swap=1 (unnamed: 0)."),
    storage: str | None = typer.Option(None, help=STORAGE_HELP),
    study: str | None = typer.Option(None, help="Study name."),
    workers: int | None = typer.Option(None, min=1, help="Number of workers."),
    address: str | None = typer.Option(None, help="Ray cluster address (auto, HOST:PORT, ray://...)."),
) -> None:
    """Ask the learned layer-path policy (optimizer hm3) for a preference, evaluate it, show where it lands."""
    from mergesearch.config import load_config
    from mergesearch.search.suggest import suggest as do_suggest

    result = do_suggest(load_config(job), prefer, storage=storage, study_name=study, workers=workers,
                        address=address)
    for line in result.lines:
        typer.echo(line)


@app.command("export")
def export_(
    job: Path | None = typer.Argument(None, metavar="[JOB.yaml]", help=JOB_HELP, show_default=False),
    trial: int = typer.Option(..., "--trial", min=0, help="Trial number (any evaluated trial)."),
    out: Path = typer.Option(..., help="Output Hugging Face model directory."),
    storage: str | None = typer.Option(None, help=STORAGE_HELP),
    study: str | None = typer.Option(None, help="Study name."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    absolute_paths: bool = typer.Option(False, "--absolute-paths", help="Keep absolute model paths in the recipe."),
) -> None:
    """Export one trial as a Hugging Face model directory with its recipe (pick chooses by preference)."""
    from mergesearch.exporting import export_trial

    storage, study = _study_ref(job, storage, study)
    path = export_trial(storage, study, trial, out, overwrite=overwrite, absolute_paths=absolute_paths,
                        progress=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"exported trial {trial} to {path}")


@app.command()
def pick(
    job: Path | None = typer.Argument(None, metavar="[JOB.yaml]", help=JOB_HELP, show_default=False),
    storage: str | None = typer.Option(None, help=STORAGE_HELP),
    study: str | None = typer.Option(None, help="Study name."),
    prefer: str = typer.Option("", help="Weights over objectives, e.g. reverse=1,swap=0.5 (default equal)."),
    minimum: list[str] = typer.Option([], "--min", help="Hard bound OBJ=V: at least as good as V (repeatable)."),
    method: str = typer.Option("asf", help="asf, pseudo-weights or knee."),
    family: str | None = typer.Option(None, help="Pick only among candidates of this family: static or twin."),
    out: Path | None = typer.Option(None, help="Export the chosen model to this directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    absolute_paths: bool = typer.Option(False, "--absolute-paths", help="Keep absolute model paths in the recipe."),
) -> None:
    """Pick one merged model from the front by preference, and optionally export it."""
    from mergesearch.search.pareto import load_front
    from mergesearch.search.preference import parse_minimums, parse_prefer
    from mergesearch.search.preference import pick as do_pick

    storage, study = _study_ref(job, storage, study)
    result = load_front(storage, study)
    if family is not None:
        from dataclasses import replace

        kept = [t for t in result.trials if t.family == family]
        if not kept:
            raise ConfigError(f"--family {family}: no trial of that family is on the front (families there: "
                              f"{', '.join(sorted({t.family for t in result.trials}))})")
        result = replace(result, trials=kept)
    weights = parse_prefer(prefer) if prefer else {name: 1.0 for name, _ in result.objectives}
    choice = do_pick(result, weights, minimums=parse_minimums(minimum), method=method)
    for line in choice.explanation:
        typer.echo(line)
    if out is not None:
        from mergesearch.exporting import export_trial

        path = export_trial(storage, study, choice.trial.number, out, overwrite=overwrite,
                            absolute_paths=absolute_paths, progress=lambda msg: typer.echo(msg, err=True))
        typer.echo(f"exported trial {choice.trial.number} to {path}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning user errors into one line and an exit code."""
    args = list(argv if argv is not None else sys.argv[1:])
    # --debug anywhere on the line (before or after the subcommand); click only knows it before
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    # transformers' per-load progress bars and info lines would drown our one-line messages
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # typer vendors click: its usage errors are typer._click exceptions, not click's
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    from mergesearch.execution.stop import EXIT_TERMINATED, Terminated, received, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # SIGTERM stops like Ctrl-C (trials re-queued, Ray shut down), exit 143
            code = app(args=args, standalone_mode=False)
            # typer turns a KeyboardInterrupt (Terminated included) into a silent return of 130
            if code == 130 and received():
                typer.echo("terminated (SIGTERM)", err=True)
                code = EXIT_TERMINATED
    except MergeSearchError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort) as e:  # click turns Ctrl-C (and SIGTERM: Terminated) into Abort
        terminated = isinstance(e, Terminated) or isinstance(e.__cause__, Terminated)
        typer.echo("terminated (SIGTERM)" if terminated else "interrupted", err=True)
        sys.exit(EXIT_TERMINATED if terminated else 130)
    except NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except ClickException as e:  # usage errors (unknown option, missing argument, bad value): one line, exit 2
        if debug:
            raise
        typer.echo(f"error: {e.format_message()} (see --help)", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # the environment, not the input: disk full, permission denied, too many files
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {e.strerror or type(e).__name__}{where}", err=True)
        sys.exit(1)
    if code == EXIT_TERMINATED:
        # Everything is stored and every worker is gone; the interpreter's own teardown (Ray's C++ core
        # finalisers) would take seconds more, which a scheduler stopping this process does not give.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if isinstance(code, int) and code:  # typer.Exit(n) in non-standalone mode comes back as a return value
        sys.exit(code)


if __name__ == "__main__":
    main()
