"""The one error type for user mistakes; the CLI prints it as a single line."""


class TransferError(Exception):
    """A problem the user can fix: bad config, missing data, unavailable weights."""
