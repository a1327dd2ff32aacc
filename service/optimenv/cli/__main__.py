"""``python -m optimenv.cli``: the ``optimenv`` command."""

from optimenv.cli import main

main()
