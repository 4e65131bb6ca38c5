"""``python -m rmtprune``: the ``rmtprune`` command."""

from rmtprune.cli import main

raise SystemExit(main())
