"""The ``helixflow`` command line.

Subcommands:
    info    what is installed: versions, the native core's build, optional GPU stack
    pull    download a known model into the local cache (or check a local path)

``helixflow serve`` and the per-service commands arrive with later issues.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
from collections.abc import Callable, Sequence

from helixflow import __version__

__all__ = ["main"]

_OPTIONAL_MODULES = ("torch", "triton", "numpy")


def _probe(module_name: str) -> str:
    """Describe whether `module_name` imports, without ever raising."""
    try:
        if importlib.util.find_spec(module_name) is None:
            return "not installed"
        module = importlib.import_module(module_name)
    # NOTE: broken installs fail in many ways (ImportError, OSError for a missing shared
    # library, RuntimeError from CUDA setup); `info` reports them instead of crashing.
    except Exception as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    return str(getattr(module, "__version__", "unknown version"))


def _probe_native() -> str:
    """Describe the compiled core, ``helixflow._native``, without ever raising."""
    try:
        native = importlib.import_module("helixflow._native")
    except Exception as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    return f"ok ({getattr(native, '__build_info__', 'no build info')})"


def _cmd_info(args: argparse.Namespace) -> int:
    rows = [
        ("helixflow", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("native", _probe_native()),
        *((name, _probe(name)) for name in _OPTIONAL_MODULES),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    # NOTE: imported here so `helixflow info` and `--help` stay fast and never touch the cache.
    from helixflow.errors import HelixFlowError
    from helixflow.pool.models.hub import pull

    try:
        path = pull(args.model, force=args.force, quiet=args.quiet)
    except HelixFlowError as exc:
        print(f"helixflow pull: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("helixflow pull: interrupted; nothing was added to the cache", file=sys.stderr)
        return 130
    print(path)
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helixflow",
        description="HelixFlow: a self-hosted, OpenAI-compatible AI inference platform.",
    )
    parser.add_argument("--version", action="version", version=f"helixflow {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="show versions and how the native core was built")
    info.set_defaults(handler=_cmd_info)
    pull = commands.add_parser(
        "pull",
        help="download a known model into the local cache and print its path",
        description="Download a known model (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) into "
        "$HELIXFLOW_HOME/models, verifying every file's sha256, and print its local path. "
        "A path to a .gguf file or a Hugging Face model directory is checked and printed as is.",
    )
    pull.add_argument("model", metavar="NAME|PATH", help="a known model name or a local path")
    pull.add_argument(
        "--force", action="store_true", help="download again, replacing a cached (corrupt) copy"
    )
    pull.add_argument("--quiet", action="store_true", help="print only the final path")
    pull.set_defaults(handler=_cmd_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``helixflow`` command line and return its exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0, usage errors 2
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
