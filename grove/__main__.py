"""``python -m grove``: the ``grove`` command."""

from grove.shell.cli import entry

entry()
