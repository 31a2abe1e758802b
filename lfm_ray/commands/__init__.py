"""Subcommands of `lfm-ray`, one module each with `register(subparsers)`."""
