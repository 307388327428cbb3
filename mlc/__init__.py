"""MLC: durable, code-first model life cycles on Temporal.

Kept import-free on purpose: the model server imports ``mlc.serving`` inside slim
containers that carry none of the orchestrator's dependencies.
"""
