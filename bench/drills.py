"""Run the whole drill suite (tests/drills, the long many-trial drills included) and print tried/passed per category.

    python bench/drills.py [--trials 10] [--json-only]

Each drill file is a category: its name after `test_drill_`. The table goes to stderr, one JSON
object to stdout: {"cpu": ..., "categories": {name: {"tried": n, "passed": n, "failed": [...]}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from _common import cpu_model

REPO = Path(__file__).resolve().parents[1]


def category(testcase: ET.Element) -> str:
    module = testcase.get("classname", "").rsplit(".", 1)[-1]
    return module.removeprefix("test_drill_") or module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10, help="kill -9 trials in the slow drill")
    ap.add_argument("--json-only", action="store_true", help="no table on stderr")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "drills.xml"
        env = {**os.environ, "SLMKIT_DRILL_TRIALS": str(args.trials)}
        t0 = time.perf_counter()
        # `-m "long or not long"`: the many-trial drills too, which the default test run leaves out.
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "long or not long",
                        str(REPO / "tests" / "drills"), f"--junitxml={report}"],
                       cwd=REPO, env=env, stdout=sys.stderr, stderr=sys.stderr)
        elapsed = time.perf_counter() - t0
        root = ET.parse(report).getroot()
    table: dict[str, dict] = defaultdict(lambda: {"tried": 0, "passed": 0, "skipped": 0, "failed": []})
    for case in root.iter("testcase"):
        row = table[category(case)]
        if case.find("skipped") is not None:
            row["skipped"] += 1
            continue
        row["tried"] += 1
        if case.find("failure") is None and case.find("error") is None:
            row["passed"] += 1
        else:
            row["failed"].append(case.get("name"))
    tried = sum(r["tried"] for r in table.values())
    passed = sum(r["passed"] for r in table.values())
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "kill_trials": args.trials, "seconds": round(elapsed, 1),
              "tried": tried, "passed": passed, "categories": dict(sorted(table.items()))}
    if not args.json_only:
        print(f"{'category':<28}{'tried':>7}{'passed':>8}{'skipped':>9}", file=sys.stderr)
        for name, row in sorted(table.items()):
            print(f"{name:<28}{row['tried']:>7}{row['passed']:>8}{row['skipped']:>9}", file=sys.stderr)
    print(json.dumps(result))
    sys.exit(0 if passed == tried else 1)


if __name__ == "__main__":
    main()
