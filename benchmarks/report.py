"""What the benchmark scripts share for their figures: percentiles and their own
section of BENCHMARKS.md, between markers, rewritten on each run."""

from __future__ import annotations

from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


def markers(script: str) -> tuple[str, str]:
    return f"<!-- benchmarks/{script}: start -->", f"<!-- benchmarks/{script}: end -->"


def write_section(path: Path, section: str, script: str) -> None:
    """Put `section` (which starts and ends with the script's markers) in place of the
    script's previous section, or at the end of the file."""
    start, end = markers(script)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
