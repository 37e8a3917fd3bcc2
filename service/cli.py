"""The `syncbn` command line: one sub-command per module.

- `syncbn train SPEC`: run one job on an embedded Ray (or `RAY_ADDRESS`), with a progress bar (`service.train`);
- `syncbn serve`: the REST service (`service.serve`);
- `syncbn submit SPEC`: send a job (or with --study a study) to a running service (`service.submit`);
- `syncbn study SPEC`: run a study on an embedded Ray and print its verdict (`service.study_run`);
- `syncbn db upgrade|current|history`: the database schema, for operators (`service.db`).

Each sub-command lives in its own module exposing `add_<name>_arguments(parser)` and `run_<name>(args) -> int`;
adding one is one line in `_COMMANDS`. Each module keeps its heavy imports (Ray, torch, uvicorn) inside
`run_<name>`, so `syncbn --help` stays fast and a command pays only for what it uses.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

#: (command, module, one-line help)
_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("train", "service.train", "Run one training job on an embedded Ray (or RAY_ADDRESS) and save its results."),
    ("serve", "service.serve", "Start the REST service (FastAPI + embedded Ray + SQLite by default)."),
    ("submit", "service.submit", "Submit a job spec to a running service, optionally following it live."),
    ("study", "service.study_run", "Run a study (paired sync/local runs) on an embedded Ray and print its verdict."),
    ("db", "service.db", "Upgrade the service's database schema, or show its revision and history."),
)


def build_parser() -> argparse.ArgumentParser:
    """The `syncbn` parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="syncbn",
        description="Exact synchronized BatchNorm: train on Ray, serve and inspect training jobs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in _COMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        getattr(module, f"add_{name}_arguments")(sub)
        sub.set_defaults(_module=module_name)
    return parser


#: Top-level packages that only the `service` extra installs: an ImportError naming one of them means the extra is
#: missing, not that the code is broken.
_SERVICE_EXTRA_MODULES = frozenset(
    {
        "ray",
        "fastapi",
        "uvicorn",
        "pydantic",
        "pydantic_settings",
        "sqlalchemy",
        "alembic",
        "yaml",
        "numpy",
        "sklearn",
        "rich",
        "prometheus_client",
        "httpx",
        "psutil",
        "pyarrow",
        "PIL",
    }
)

MISSING_EXTRA_HINT = (
    "the `syncbn` command (train, serve, submit, study, db) needs the service extra, which is not installed: "
    "{missing} is missing. Install it with: pip install 'syncbn[service]' "
    "(the library alone, `import syncbn`, needs torch only)"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `syncbn` script; returns the process exit code.

    A library-only install (`pip install syncbn`, torch alone) has this script too; there it says which extra to
    install instead of showing a traceback.
    """
    try:
        args = build_parser().parse_args(argv)
        module = importlib.import_module(args._module)
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if top not in _SERVICE_EXTRA_MODULES:
            raise
        sys.stderr.write(f"syncbn: {MISSING_EXTRA_HINT.format(missing=top)}\n")
        return 2
    return int(getattr(module, f"run_{args.command}")(args))


if __name__ == "__main__":
    sys.exit(main())
