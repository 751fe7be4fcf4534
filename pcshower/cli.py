"""The ``pcshower`` command line: one console script, one subcommand per job.

Each subsystem contributes its subcommands through a ``register(subparsers)`` function in its
own ``cli`` module, listed in ``_SUBCOMMAND_MODULES``; the handler it sets as ``func`` receives
the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

__all__ = ["main", "build_parser", "seed_arg"]

_SUBCOMMAND_MODULES = (
    "pcshower.io.cli",          # info, convert
    "pcshower.simulate.cli",    # simulate
    "pcshower.geometry.cli",    # geometry list/show, project
    "pcshower.models.cli",      # train, generate
    "pcshower.evaluate.cli",    # evaluate
    "pcshower.bench",           # bench
)


class UserError(Exception):
    """An error caused by the user's input: printed as one clear line, no traceback."""


def seed_arg(limit: int = 2 ** 64):
    """An argparse ``type`` for ``--seed``: a whole number in ``[0, limit)`` (torch and NumPy
    take 64-bit seeds; scikit-learn's ``random_state`` 32-bit ones)."""
    shown = "2**64" if limit == 2 ** 64 else f"{limit}"

    def seed(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not 0 <= value < limit:
            raise argparse.ArgumentTypeError(f"must be a whole number in [0, {shown}), got {value}")
        return value

    return seed


def build_parser() -> argparse.ArgumentParser:
    from pcshower import __version__

    parser = argparse.ArgumentParser(
        prog="pcshower",
        description="Calorimeter showers from point-cloud generative models, for any geometry. "
                    "Units: mm, MeV deposits, GeV incident energies; angles in degrees on the "
                    "command line.")
    parser.add_argument("--version", action="version", version=f"pcshower {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not (name == err.name or name.startswith(f"{err.name}.")):
                raise  # a real missing dependency inside the module, not the module itself
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # a user reads "pcshower generate: warning: ...", not a source line of pcshower
        print(f"pcshower {args.command}: warning: {message}", file=file or sys.stderr)

    shown, warnings.showwarning = warnings.showwarning, show_warning
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, KeyError, FloatingPointError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"pcshower {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # I/O: read-only folders, full disks
        print(f"pcshower {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pcshower {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
