"""``verticals``: the one command-line entry point.

Platform commands live here; ``verticals core ...`` collects commands registered by core modules
(``register(app)`` in ``core.model.commands``, ``core.quant.commands``, ...), and each built solution
adds its own group from ``solutions/<name>/cli.py:app``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import signal
import sys
import time
from typing import Annotated, Any

import typer

from core.errors import VerticalsError
from core.settings import SOLUTION_NAMES, get_settings, reset_settings

app = typer.Typer(
    name="verticals",
    help="Verticals: customer-service, medical-imaging and industrial-QA AI on one shared core.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema (Alembic).", no_args_is_help=True)
core_app = typer.Typer(help="The shared ML core: model, training, quantization, continual learning.",
                       no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(core_app, name="core")

CORE_COMMAND_MODULES = (
    "core.model.commands",
    "core.train.commands",
    "core.train.dist_commands",
    "core.quant.commands",
    "core.continual.commands",
)


def err(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)


def _selected(solutions: str | None) -> list[str]:
    if not solutions:
        return get_settings().solutions
    names = [s.strip().replace("-", "_") for s in solutions.split(",") if s.strip()]
    unknown = [n for n in names if n not in SOLUTION_NAMES]
    if unknown:
        raise VerticalsError(
            f"unknown solution(s): {', '.join(unknown)}; choose from {', '.join(n.replace('_', '-') for n in SOLUTION_NAMES)}"
        )
    return names


@app.callback()
def _root(log_level: Annotated[str, typer.Option(help="Logging level for stderr.")] = "WARNING") -> None:
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@db_app.command("upgrade")
def db_upgrade(revision: str = "heads") -> None:
    """Create or migrate every table to the latest schema."""
    from infra.migrate import upgrade

    upgrade(revision)
    typer.echo(f"database at {revision}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revisions the database is at."""
    from infra.migrate import current

    for rev in current():
        typer.echo(rev)


@app.command()
def up(
    solutions: Annotated[str | None, typer.Option(help="Comma-separated solutions to start (default: all built).")] = None,
    consoles: Annotated[bool, typer.Option(help="Start the Streamlit consoles.")] = True,
    train: Annotated[bool, typer.Option(help="Queue training of missing default models.")] = True,
) -> None:
    """Start the whole product: workers per queue, consoles, background training of missing models."""
    from core.db import check_database
    from core.registry import built_solutions, submit_missing_models
    from core.supervisor import Supervisor
    from infra.migrate import upgrade

    settings = get_settings()
    manifests = built_solutions(_selected(solutions))
    check_database()
    upgrade("heads")
    sup = Supervisor(settings)
    stopping = {"flag": False}

    def _stop(signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        urls = sup.start(manifests, consoles=consoles)
        if train and settings.auto_train:
            for key in submit_missing_models(manifests):
                typer.echo(f"training queued in the background: {key}")
        if not manifests:
            typer.echo("no solution is built yet: platform and training workers only")
        late = sup.wait_ready(urls)
        for title, url in urls.items():
            state = "starting" if title in late else "ready"
            typer.echo(f"{title:<20} {url}  ({state})")
        typer.echo(f"logs: {sup.log_dir}   status: verticals status   stop: Ctrl-C")
        while not stopping["flag"]:
            dead = sup.dead()
            if dead:
                err(f"process(es) exited: {', '.join(dead)}; see {sup.log_dir}")
                break
            time.sleep(0.5)
    finally:
        typer.echo("stopping ...", err=True)
        sup.stop()
        typer.echo("stopped", err=True)


@app.command()
def worker(
    queue: Annotated[str, typer.Argument(help="A solution name, or 'platform' / 'training'.")],
    concurrency: Annotated[int, typer.Option("--concurrency", "-c")] = 1,
    loglevel: str = "INFO",
) -> None:
    """Run one Celery worker process for a queue (replaces this process)."""
    import os

    from core.supervisor import worker_command

    q = queue.replace("-", "_")
    if q not in (*SOLUTION_NAMES, "platform", "training"):
        raise VerticalsError(f"unknown queue {queue!r}; choose from platform, training, "
                             + ", ".join(n.replace('_', '-') for n in SOLUTION_NAMES))
    cmd = worker_command([q], q, concurrency, loglevel)
    os.execv(cmd[0], cmd)


@app.command()
def console(
    solution: Annotated[str, typer.Argument(help="industrial-qa, customer-service or medical-imaging.")],
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Run one solution's Streamlit console (replaces this process)."""
    import os

    from core.registry import load_manifest
    from core.supervisor import console_command

    name = _selected(solution)[0]
    m = load_manifest(name)
    if m is None or not m.console_entry.exists():
        raise VerticalsError(f"solution {solution!r} has no console in this checkout")
    s = get_settings()
    cmd = console_command(m, s.console_host, port or s.console_port(name))
    os.execv(cmd[0], cmd)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Queues, workers alive, database reachable, models present, background jobs."""
    from core.status import collect_status, render_status

    st = collect_status()
    if as_json:
        typer.echo(json.dumps(st, default=str))
    else:
        render_status(st)
    if not st["database"]["ok"]:
        raise typer.Exit(1)


def _register_core_commands() -> None:
    for mod in CORE_COMMAND_MODULES:
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) and importlib.util.find_spec(mod):
            importlib.import_module(mod).register(core_app)


def _register_solution_commands() -> None:
    for name in SOLUTION_NAMES:
        if importlib.util.find_spec(f"solutions.{name}") and importlib.util.find_spec(f"solutions.{name}.cli"):
            sub = importlib.import_module(f"solutions.{name}.cli").app
            app.add_typer(sub, name=name.replace("_", "-"))


def _register_platform_commands() -> None:
    for mod in ("core.chaos", "core.capacity", "core.auth_cli"):
        if importlib.util.find_spec(mod):
            importlib.import_module(mod).register(app)


_register_core_commands()
_register_solution_commands()
_register_platform_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: user errors print one line and exit 2, never a traceback."""
    from sqlalchemy.exc import OperationalError

    try:
        app(args=argv, standalone_mode=True)
    except VerticalsError as e:
        err(str(e))
        sys.exit(2)
    except OperationalError as e:
        err(f"database error: {str(e.orig).strip().splitlines()[0] if e.orig else e}")
        sys.exit(2)
    except Exception as e:
        from kombu.exceptions import OperationalError as BrokerError

        if isinstance(e, BrokerError):
            err(f"broker unreachable: {e}")
            sys.exit(2)
        raise
    finally:
        reset_settings()


if __name__ == "__main__":
    main()
