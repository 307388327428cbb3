"""Ready-to-register example model packages for the demo and the test suite.

The cc-fraud package commits only code and its manifest; its data and trained model are
generated on first use (deterministically, in a few seconds) so the repository stays
small and nobody has to trust a committed pickle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlc.errors import InvalidPackageError, NotFoundError

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "models"
"""Where the example packages live in a source checkout."""

_BUILD_STEPS = ("generate_data.py", "train.py")
_MODEL_FILE = "model.joblib"
_BUILD_TIMEOUT_SECONDS = 300.0


def prepare_example_model(dest: Path | None = None, *, name: str = "cc-fraud") -> Path:
    """Return the directory of a trained, ready-to-register copy of example ``name``.

    The checkout's own copy is trained in place when it can be written to, so later
    calls (every test fixture) are cheap copies; otherwise training happens in ``dest``.

    Args:
        dest: Copy the package here (created if needed) and return it; None returns the
            package inside the checkout.
        name: Which example under ``examples/models``.

    Raises:
        NotFoundError: the example is not in this installation (it ships with the source).
        InvalidPackageError: generating data or training failed; carries the output tail.
    """
    source = EXAMPLES_DIR / name
    if not (source / "manifest.yaml").is_file():
        raise NotFoundError(
            f"example model {name!r} is not at {source}; examples ship with the source "
            "checkout, not with an installed wheel"
        )
    if os.access(source, os.W_OK):
        _train(source)
    if dest is None:
        return source
    shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.tmp"))
    _train(dest)
    return dest


def _train(package: Path) -> None:
    """Run the package's build steps unless its model file is already there."""
    if (package / _MODEL_FILE).is_file():
        return
    for step in _BUILD_STEPS:
        try:
            subprocess.run(
                [sys.executable, step],
                cwd=package,
                check=True,
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_SECONDS,
            )
        except subprocess.CalledProcessError as exc:
            tail = "\n".join((exc.stdout + exc.stderr).splitlines()[-20:])
            raise InvalidPackageError(
                f"{package / step} failed with exit code {exc.returncode}; "
                f"is the 'models' extra (scikit-learn, numpy) installed?\n{tail}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise InvalidPackageError(
                f"{package / step} did not finish within {_BUILD_TIMEOUT_SECONDS:.0f} s"
            ) from exc
