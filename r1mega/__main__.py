"""``python -m r1mega``: the same as the ``r1mega`` command."""

from r1mega.cli import main

raise SystemExit(main())
