"""Subcommands of the ``rmtprune`` CLI, one module each (``add_parser`` + ``run``)."""
