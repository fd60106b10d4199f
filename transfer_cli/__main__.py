"""`python -m transfer_cli` is the same as the `transfer` command."""

from transfer_cli.cli import main


if __name__ == "__main__":
    raise SystemExit(main())
