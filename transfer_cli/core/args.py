"""Argument parsing for the commands that are not Hydra's."""

from __future__ import annotations

import argparse
from typing import NoReturn

from transfer_cli.core.errors import TransferError


class CommandParser(argparse.ArgumentParser):
    """argparse whose mistakes are a TransferError, so they print as one `transfer: error:` line."""

    def error(self, message: str) -> NoReturn:
        raise TransferError(f"{self.prog}: {message} (see `{self.prog} --help`)")
