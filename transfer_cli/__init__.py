"""transfer: a command-line experiment runner for image transfer learning."""

__version__ = "0.1.0"
