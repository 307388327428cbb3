"""Activities: every side effect of a lifecycle (runtimes, tests, inventory, notifications)."""
