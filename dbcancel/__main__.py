"""`python -m dbcancel`: see `dbcancel.cli`."""

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m dbcancel"))
