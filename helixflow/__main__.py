"""``python -m helixflow``: the same entry point as the ``helixflow`` command."""

from helixflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
