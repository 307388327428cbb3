"""Write deterministic synthetic card transactions to ``data/train.jsonl`` and ``data/eval.jsonl``.

The data is generated, not committed, so the package stays small; a fixed seed makes
every run byte-identical, which keeps snapshot digests and the model's outputs stable.
Fraud follows a known logistic model of the features (large amounts, risky merchants,
far from home, abroad, card not present, bursts of activity, night hours) plus noise,
at a base rate of about 4%, so a simple classifier can learn it but not perfectly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SEED = 20240611
TRAIN_ROWS = 20_000
EVAL_ROWS = 2_000
DATA_DIR = Path(__file__).resolve().parent / "data"


def generate(rows: int, rng: np.random.Generator) -> list[dict[str, object]]:
    """Return ``rows`` labelled transactions drawn from ``rng``."""
    amount = np.round(rng.lognormal(mean=3.6, sigma=1.0, size=rows), 2)
    hour = rng.choice(24, size=rows, p=_hour_weights())
    merchant_risk = np.round(rng.beta(2.0, 8.0, size=rows), 4)
    distance = np.round(rng.lognormal(mean=1.8, sigma=1.2, size=rows), 2)
    foreign = rng.random(rows) < 0.07
    card_present = rng.random(rows) < 0.65
    velocity = rng.poisson(2.0, size=rows)

    night = (hour < 6).astype(float)
    logit = (
        -12.8
        + 1.2 * np.log1p(amount)
        + 9.0 * merchant_risk
        + 0.7 * np.log1p(distance)
        + 2.2 * foreign
        - 2.2 * card_present
        + 0.55 * velocity
        + 1.8 * night
        + rng.normal(0.0, 0.3, size=rows)
    )
    is_fraud = rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))
    return [
        {
            "amount": float(amount[i]),
            "hour": int(hour[i]),
            "merchant_risk": float(merchant_risk[i]),
            "distance_from_home": float(distance[i]),
            "foreign": bool(foreign[i]),
            "card_present": bool(card_present[i]),
            "velocity_24h": int(velocity[i]),
            "is_fraud": int(is_fraud[i]),
        }
        for i in range(rows)
    ]


def _hour_weights() -> np.ndarray:
    """Daytime-heavy distribution of transaction hours."""
    weights = np.array([1, 1, 1, 1, 1, 2, 3, 5, 7, 8, 8, 9, 10, 9, 8, 8, 8, 9, 9, 8, 6, 4, 3, 2], dtype=float)
    normalised: np.ndarray = weights / weights.sum()
    return normalised


def write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    """Write ``records`` atomically, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    tmp.replace(path)


def main() -> None:
    """Generate both files from one seeded stream."""
    rng = np.random.default_rng(SEED)
    train = generate(TRAIN_ROWS, rng)
    evaluation = generate(EVAL_ROWS, rng)
    write_jsonl(DATA_DIR / "train.jsonl", train)
    write_jsonl(DATA_DIR / "eval.jsonl", evaluation)
    rate = sum(r["is_fraud"] == 1 for r in train) / len(train)
    print(f"wrote {len(train)} training and {len(evaluation)} evaluation rows; fraud rate {rate:.3f}")


if __name__ == "__main__":
    main()
