"""Entry point: `python -m bench.run --quick|--full [--only send,fanout,…]`.

Writes bench/results/latest.json (the keys of issue #4 exactly, plus details), a
markdown table (latest.md) and PNG plots beside them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import RESULTS, progress
from bench.report import write_report

SCENARIOS = ["send", "fanout", "idle_ws", "history", "resume_storm"]


async def main(quick: bool, only: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "started_at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
    }
    for name in only:
        started = time.monotonic()
        progress(f"== {name} ==")
        module = importlib.import_module(f"bench.scenarios.{name}")
        try:
            results[name] = await module.run(quick)
        except Exception as exc:  # one broken scenario must not hide the others
            progress(f"{name} FAILED: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    import uvloop

    results = uvloop.run(main(args.quick, only))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_report(results)
    progress(f"wrote {RESULTS / 'latest.json'}")
    failed = [name for name in only if "error" in results.get(name, {})]
    if failed:
        raise SystemExit(f"scenarios failed: {', '.join(failed)}")


if __name__ == "__main__":
    cli()
