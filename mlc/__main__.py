"""``python -m mlc``: the same as the ``mlc`` command (the lifecycle sandbox and the tests run it).

The program's entry script, not part of the core: nothing imports it, so its import of the
CLI above the core is the one the import rules allow (``tests/test_import_rules.py``).
"""

from cli import main

main()
