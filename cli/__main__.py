"""``python -m mlc``: the same as the ``mlc`` command."""

from mlc.cli import main

main()
