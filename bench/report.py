"""latest.json's flat keys, the markdown table and the plots."""

from __future__ import annotations

import json
import math
from typing import Any

from bench.common import RESULTS

# The keys issue #4 names, as "scenario.key".
KEYS = [
    "send.parley_per_s",
    "send.baseline_per_s",
    "send.pgbench_tps",
    "send.ratio",
    "send.vs_pgbench",
    "fanout.parley_deliveries_per_s",
    "fanout.baseline_deliveries_per_s",
    "fanout.ratio",
    "fanout.p50_ms",
    "fanout.p99_ms",
    "idle_ws.kib_per_connection",
    "history.p99_small_ms",
    "history.p99_large_ms",
    "history.ratio",
    "resume_storm.seconds",
    "resume_storm.lost",
]

# §11 goals: (key, comparison, threshold, what it means).
GOALS = [
    ("send.ratio", ">=", 0.5, "persisted sends/s ≥ 0.5× bare ASGI + asyncpg INSERT"),
    ("fanout.ratio", ">=", 0.7, "deliveries/s ≥ 0.7× bare `websockets` broadcast"),
    ("fanout.p99_ms", "<=", 100.0, "p99 ≤ 100 ms at 50 % of the knee"),
    ("idle_ws.kib_per_connection", "<=", 20.0, "≤ 20 KiB per idle WebSocket"),
    ("history.ratio", "<=", 1.3, "p99 at the large conversation ≤ 1.3× at 10,000"),
    ("resume_storm.lost", "==", 0, "storm of resumes: nothing lost"),
]


def flat(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in KEYS:
        scenario, name = key.split(".", 1)
        value = results.get(scenario, {}).get(name)
        out[key] = value
    return out


def _met(value: Any, op: str, threshold: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    ok = {">=": value >= threshold, "<=": value <= threshold, "==": value == threshold}[op]
    return "met" if ok else "NOT met"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    values = flat(results)
    lines = [
        f"Benchmark ({results.get('mode')}, {results.get('started_at', '')[:19]} UTC, "
        f"{results.get('machine', {}).get('cpus')} CPUs). Baselines measured in the same run.",
        "",
        "| figure | value | goal | status |",
        "|---|---|---|---|",
    ]
    goals = {key: (op, threshold, text) for key, op, threshold, text in GOALS}
    for key in KEYS:
        goal = goals.get(key)
        goal_text = f"{goal[0]} {goal[1]} ({goal[2]})" if goal else ""
        status = _met(values[key], goal[0], goal[1]) if goal else ""
        lines.append(f"| `{key}` | {_fmt(values[key])} | {goal_text} | {status} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results.update(flat(results))
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "latest.md").write_text(markdown(results))
    plot(results)


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    send = results.get("send", {})
    if "levels" in send:
        levels = sorted(send["levels"], key=int)
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.27
        xs = range(len(levels))
        for offset, (label, key, spread) in enumerate(
            [
                ("Parley", "parley_per_s", "parley_spread"),
                ("bare ASGI + asyncpg", "baseline_per_s", "baseline_spread"),
                ("pgbench INSERT", "pgbench_tps", "pgbench_spread"),
            ]
        ):
            heights = [send["levels"][lv][key] for lv in levels]
            lows = [send["levels"][lv][key] - send["levels"][lv][spread]["min"] for lv in levels]
            highs = [send["levels"][lv][spread]["max"] - send["levels"][lv][key] for lv in levels]
            ax.bar(
                [x + (offset - 1) * width for x in xs],
                heights,
                width,
                yerr=[lows, highs],
                capsize=3,
                label=label,
            )
        ax.set_xticks(list(xs), [f"c={lv}" for lv in levels])
        ax.set_ylabel("persisted writes / s (median, min–max)")
        ax.set_title("send: Parley vs the floor, same run")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "send.png", dpi=110)
        plt.close(fig)

    fanout = results.get("fanout", {})
    if fanout.get("steps"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, key in (("Parley", "parley"), ("bare websockets", "baseline")):
            steps = [s for s in fanout["steps"] if s.get("server") == key]
            if steps:
                ax.plot(
                    [s["offered_per_s"] for s in steps],
                    [s["deliveries_per_s"] for s in steps],
                    marker="o",
                    label=f"{label} deliveries/s",
                )
        ax.set_xlabel("offered sends / s")
        ax.set_ylabel("deliveries / s")
        ax2 = ax.twinx()
        steps = [s for s in fanout["steps"] if s.get("server") == "parley"]
        ax2.plot(
            [s["offered_per_s"] for s in steps],
            [s["p99_ms"] for s in steps],
            color="gray",
            linestyle="--",
            label="Parley p99 ms",
        )
        ax2.set_ylabel("end-to-end p99 (ms)")
        ax.set_title(f"fanout: one room, {fanout.get('members')} connected members")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(RESULTS / "fanout.png", dpi=110)
        plt.close(fig)

    history = results.get("history", {})
    if "p99_small_ms" in history and "p99_large_ms" in history:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar(
            [f"{history.get('small_size', 10_000):,}", f"{history.get('large_size', 0):,}"],
            [history["p99_small_ms"], history["p99_large_ms"]],
        )
        ax.set_ylabel("page latency p99 (ms)")
        ax.set_title("history: messages in the conversation")
        fig.tight_layout()
        fig.savefig(RESULTS / "history.png", dpi=110)
        plt.close(fig)
