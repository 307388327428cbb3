"""What the CLI's read commands show, computed in one place.

The server's routes and the CLI's direct mode (no ``MLC_API_URL``) call the same functions
over the same store queries, so ``mlc ... --json`` prints the same rows either way.
"""
