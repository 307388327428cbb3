"""The server-side halves of the CLI's writes: what happens to a statement a client signed.

Signing stays with the person (``mlc.trust.signer``); these functions only verify and
record, so ``mlc server`` and the CLI's direct mode run the very same code.
"""
