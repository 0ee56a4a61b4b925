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
    "send.pgbench_send_statement_tps",
    "send.vs_send_statement",
    "send.bare_send_statement_per_s",
    "send.bare_send_statement_ratio",
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
        width = 0.16
        xs = range(len(levels))
        for offset, (label, key, spread) in enumerate(
            [
                ("Parley", "parley_per_s", "parley_spread"),
                ("bare ASGI + asyncpg INSERT", "baseline_per_s", "baseline_spread"),
                (
                    "bare ASGI + Parley's send statement",
                    "bare_send_statement_per_s",
                    "bare_send_statement_spread",
                ),
                ("pgbench INSERT", "pgbench_tps", "pgbench_spread"),
                (
                    "pgbench, Parley's send statement",
                    "pgbench_send_statement_tps",
                    "pgbench_send_statement_spread",
                ),
            ]
        ):
            heights = [send["levels"][lv][key] for lv in levels]
            lows = [send["levels"][lv][key] - send["levels"][lv][spread]["min"] for lv in levels]
            highs = [send["levels"][lv][spread]["max"] - send["levels"][lv][key] for lv in levels]
            ax.bar(
                [x + (offset - 2) * width for x in xs],
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
        _plot_fanout(
            plt, fanout, "fanout.png", f"one room, {fanout.get('members')} connected members"
        )
    rooms = fanout.get("rooms_100x10", {})
    if rooms.get("steps"):
        _plot_fanout(plt, rooms, "fanout_rooms.png", "100 rooms × 10 connected members")

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


def _plot_fanout(plt: Any, fanout: dict[str, Any], filename: str, title: str) -> None:
    """Left: deliveries/s against the offered send rate (the knee). Right: end-to-end
    p50/p99. The half-knee step, where p50/p99 are reported, is the star."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    members = fanout.get("members_per_room") or fanout.get("members") or 1
    for label, key, color in (("Parley", "parley", "C0"), ("bare websockets", "baseline", "C1")):
        steps = sorted(
            (
                s
                for s in fanout["steps"]
                if s.get("server") == key and not s.get("half_knee") and not s.get("repeat")
            ),
            key=lambda s: s["offered_per_s"],
        )
        if not steps:
            continue
        repeats = [s for s in fanout["steps"] if s.get("server") == key and s.get("repeat")]
        if repeats:
            left.plot(
                [s["offered_per_s"] for s in repeats],
                [s["deliveries_per_s"] for s in repeats],
                marker="x",
                color=color,
                linestyle="none",
                label=f"{label}, knee repeated",
            )
        xs = [s["offered_per_s"] for s in steps]
        left.plot(xs, [s["deliveries_per_s"] for s in steps], marker="o", color=color, label=label)
        right.plot(xs, [s["p99_ms"] for s in steps], marker="o", color=color, label=f"{label} p99")
        right.plot(
            xs,
            [s["p50_ms"] for s in steps],
            marker=".",
            linestyle=":",
            color=color,
            label=f"{label} p50",
        )
    half = [s for s in fanout["steps"] if s.get("half_knee")]
    for i, s in enumerate(half):
        left.plot(
            [s["offered_per_s"]],
            [s["deliveries_per_s"]],
            marker="*",
            markersize=14,
            color="C0",
            linestyle="none",
            label="Parley at ½ knee" if i == 0 else "_nolegend_",
        )
        right.plot(
            [s["offered_per_s"]],
            [s["p99_ms"]],
            marker="*",
            markersize=14,
            color="C0",
            linestyle="none",
            label="Parley p99 at ½ knee (each round)" if i == 0 else "_nolegend_",
        )
    xs_all = sorted({s["offered_per_s"] for s in fanout["steps"]})
    if xs_all:
        left.plot(
            xs_all,
            [x * members for x in xs_all],
            color="gray",
            linestyle="--",
            linewidth=0.8,
            label="offered deliveries/s",
        )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("offered sends / s")
    left.set_ylabel("deliveries / s")
    left.set_title(f"fanout: {title}")
    left.legend(fontsize=8)
    right.axhline(
        fanout.get("goal_p99_ms", 100), color="red", linewidth=0.8, linestyle="--", label="goal p99"
    )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("offered sends / s")
    right.set_ylabel("end-to-end latency (ms)")
    right.set_title("latency from the sender's timestamp")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / filename, dpi=110)
    plt.close(fig)
