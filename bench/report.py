"""Results of one run: figures, metrics against baselines and targets, machine info, and renderers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

# The seven figures of BRIEF §4 and the replicas of issue 12, in order; --check requires every one of them to be measured.
FIGURES: dict[str, str] = {
    "1_failure_detection": "Failure detection (SIGKILL -> DOWN at a watcher)",
    "2_failover": "Failover (SIGKILL an agent holding N running tasks)",
    "3_heartbeat_capacity": "Heartbeat capacity (K sessions at 1 Hz; saturation)",
    "4_unary_latency": "Unary latency (Register/Get/Discover vs echo unary)",
    "5_task_throughput": "Task throughput and dispatch latency",
    "6_rest_gateway": "REST gateway vs FastAPI (wrk)",
    "7_restart": "Restart (10k agents + 100k tasks in the store)",
    "8_replicas": "Replicas on PostgreSQL (1 vs 2 replicas; SIGKILL of one)",
}

MEASURED = "measured"
NOT_MEASURED = "not measured"
ERROR = "error"


@dataclass
class Metric:
    """One number of a figure, with the baseline it is compared to and its target."""

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None

    @staticmethod
    def compare(
        name: str,
        value: float | None,
        unit: str,
        baseline: float | None,
        baseline_name: str,
        *,
        max_ratio: float | None = None,
        min_ratio: float | None = None,
    ) -> Metric:
        """A metric judged by its ratio to a same-run baseline (value / baseline)."""
        ratio = value / baseline if value is not None and baseline else None
        target, met = "", None
        if max_ratio is not None:
            target = f"ratio <= {max_ratio:g}"
            met = ratio is not None and ratio <= max_ratio
        elif min_ratio is not None:
            target = f"ratio >= {min_ratio:g}"
            met = ratio is not None and ratio >= min_ratio
        return Metric(name, value, unit, baseline, baseline_name, ratio, target, met)

    @staticmethod
    def absolute(
        name: str,
        value: float | None,
        unit: str,
        *,
        at_most: float | None = None,
        at_least: float | None = None,
        equals: float | None = None,
        baseline: float | None = None,
        baseline_name: str = "",
    ) -> Metric:
        """A metric judged by an absolute bound (a baseline, if given, is shown with its ratio)."""
        ratio = value / baseline if value is not None and baseline else None
        target, met = "", None
        if at_most is not None:
            target, met = f"<= {at_most:g} {unit}".strip(), value is not None and value <= at_most
        elif at_least is not None:
            target, met = f">= {at_least:g} {unit}".strip(), value is not None and value >= at_least
        elif equals is not None:
            target, met = f"= {equals:g}", value is not None and value == equals
        return Metric(name, value, unit, baseline, baseline_name, ratio, target, met)


@dataclass
class Figure:
    """One figure of BRIEF §4 as measured in this run."""

    key: str
    title: str
    status: str = MEASURED
    reason: str = ""
    metrics: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def missed(self) -> list[Metric]:
        return [m for m in self.metrics if m.met is False]


@dataclass
class Report:
    """Everything one run produced."""

    mode: str
    machine: dict[str, Any]
    baselines: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0

    def missing(self) -> list[str]:
        """Keys of the figures that were not produced (absent, skipped or failed)."""
        done = {f.key for f in self.figures if f.status == MEASURED and f.metrics}
        return [k for k in FIGURES if k not in done]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False, default=str)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """Cores, CPU, memory, Python and library versions, date: what the numbers were measured on."""
    mem_total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(mem_total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "uvloop": _version("uvloop"),
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
        "git_commit": _git_commit(),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _met(metric: Metric) -> str:
    return {True: "met", False: "MISSED", None: ""}[metric.met]


def table_rows(report: Report) -> list[list[str]]:
    """The result table: one row per metric, one row per unmeasured figure."""
    rows: list[list[str]] = []
    by_key = {f.key: f for f in report.figures}
    for key, title in FIGURES.items():
        fig = by_key.get(key)
        label = f"{key.split('_', 1)[0]}. {title.split(' (')[0]}"
        if fig is None:
            rows.append([label, "not run", "", "", "", "", ""])
            continue
        if fig.status != MEASURED:
            rows.append([label, f"{fig.status}: {fig.reason}", "", "", "", "", ""])
            continue
        for i, m in enumerate(fig.metrics):
            value = f"{_fmt(m.value)} {m.unit}".strip()
            base = f"{_fmt(m.baseline)} ({m.baseline_name})" if m.baseline is not None else ""
            ratio = f"{m.ratio:.2f}x" if m.ratio is not None else ""
            rows.append([label if i == 0 else "", m.name, value, base, ratio, m.target, _met(m)])
    return rows


HEADER = ["figure", "metric", "value", "baseline", "ratio", "target", ""]


def render_text(report: Report) -> str:
    rows = [HEADER, *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['date']} · {m['cores']} cores ({m['cpu']}) · {m['memory_gib']} GiB · Python {m['python']} · "
        f"grpcio {m['grpcio']} · protobuf {m['protobuf']} · uvloop {m['uvloop']} · "
        f"FastAPI {m['fastapi']} / uvicorn {m['uvicorn']} · commit {m['git_commit']} · "
        f"load at start {m['load_average_at_start']}"
    )


def render_markdown(report: Report) -> str:
    out = [
        f"# Benchmark results ({report.mode})",
        "",
        _machine_line(report.machine),
        "",
        f"Total run time: {report.seconds:.0f} s. Ratios are value / baseline, both measured in this run.",
        "",
        "| " + " | ".join([*HEADER[:-1], "met"]) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for row in table_rows(report):
        out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    out += ["", "## Baselines (same run)", ""]
    for name, values in report.baselines.items():
        out.append(f"- **{name}**: `{json.dumps(values, default=str)}`")
    out += ["", "## Notes per figure", ""]
    for fig in report.figures:
        out.append(f"### {fig.key}: {fig.title}")
        if fig.status != MEASURED:
            out.append(f"- {fig.status}: {fig.reason}")
        for note in fig.notes:
            out.append(f"- {note}")
        out.append(f"- took {fig.seconds:.1f} s")
        out.append("")
    missing = report.missing()
    out.append(f"Figures not produced: {', '.join(missing) if missing else 'none'}.")
    return "\n".join(out) + "\n"


def write(report: Report, directory: Path, stem: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    json_path.write_text(report.to_json() + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
