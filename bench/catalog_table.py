"""One table of normalized accuracy per method (rows) and pool (columns) from ``bench/quality.py`` output folders.

    python bench/catalog_table.py minilm_frozen_head_lora=runs/gen15/catalog_minilm_frozen_head_lora,runs/gen15/catalog2_minilm_frozen_head_lora ...

Each argument is ``label=folder[,folder…]``: every ``<folder>/<method>/eval.json`` of that pool; a row is normalized
by the pool's expert row (each task's accuracy over its expert's, averaged), found in any of its folders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common  # noqa: F401  (the checkout's adamerge on the path)


def pool_rows(folders: list[Path]) -> dict[str, float]:
    """Normalized accuracy (%) of every merge row in ``folders``, by row label (adamerge.evaluate.summarize, as the
    runs' own tables, against the expert row found in any of them)."""
    from adamerge.evaluate import summarize

    rows, tasks = {}, None
    for f in folders:
        for run in sorted(f.glob("*/eval.json")):
            report = json.loads(run.read_text())
            tasks = report["tasks"]
            rows.update({label: {t: row[t] for t in tasks} for label, row in report["rows"].items()})
    if "expert" not in rows:
        raise SystemExit(f"no expert row in {folders}")
    return {label: 100 * row["norm"] for label, row in summarize(rows)["rows"].items()
            if label not in ("expert", "pretrained") and not label.startswith("start")}


def main(argv: list[str]) -> None:
    pools = {a.split("=", 1)[0]: pool_rows([Path(p) for p in a.split("=", 1)[1].split(",")]) for a in argv}
    labels = sorted({label for rows in pools.values() for label in rows})
    print("| method | " + " | ".join(pools) + " |")
    print("|---" * (len(pools) + 1) + "|")
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{rows[label]:.1f}" if label in rows else "–" for rows in pools.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
