"""Where a GPU's idle time lies between its kernels (``train.profiling``, ``benchmarks.issue6_verdict``): the gaps
in the union of the kernels' spans, by size. Pure Python, no torch: the verdict that reads profiles from JSON imports
it too."""

from __future__ import annotations

# gap sizes (µs) that tell the GPU's idle time apart: under the first, a kernel boundary (the next kernel was queued
# already: launch latency and the tail of the one before); up to the second, the host barely ahead (a short stretch
# of small kernels it launches slower than the GPU runs them); beyond, the GPU waited for the host (a sync, a
# graph break's guards, Python between compiled regions, the data)
GAP_BOUNDS_US = (10.0, 100.0)


def idle_gaps(kernels: list[tuple[float, float, str]], steps: int, top: int = 5) -> dict:
    """Where a GPU's idle time lies between the first kernel's start and the last one's end: the gaps in the union of
    the ``(start, end, name)`` kernels (µs, any stream), their count and seconds per step in each size class of
    ``GAP_BOUNDS_US``, and the ``top`` largest with the kernel that ran last before each and the one that ended it.
    The busy time and this idle time make up that window; the host's time before the first kernel or after the
    last is in neither. An empty span (start == end) is left out: it would split a gap in two."""
    small, large = GAP_BOUNDS_US
    classes = {f"under {small:g} us": [0, 0.0], f"{small:g}-{large:g} us": [0, 0.0], f"{large:g} us and over": [0, 0.0]}
    names = list(classes)
    found: list[tuple[float, str, str]] = []
    reached, last = float("-inf"), ""
    for start, end, name in sorted(kernels, key=lambda k: (k[0], k[1])):
        if end <= start:  # a kernel too short for the profiler's clock
            continue
        if start > reached > float("-inf"):
            gap = start - reached
            counted = classes[names[0] if gap < small else names[1] if gap < large else names[2]]
            counted[0] += 1
            counted[1] += gap
            found.append((gap, last, name))
        if end > reached:
            reached, last = end, name
    found.sort(key=lambda g: -g[0])
    return {
        "idle_s_per_step": sum(c[1] for c in classes.values()) / 1e6 / steps,
        "by_size": {k: {"gaps_per_step": n / steps, "s_per_step": us / 1e6 / steps} for k, (n, us) in classes.items()},
        "largest": [{"us": gap, "after": a[:120], "before": b[:120]} for gap, a, b in found[:top]],
    }


def describe_idle(idle: dict) -> str:
    """``idle_gaps``' record in words: the idle ms per step between kernels, by the gaps' sizes, and the longest."""
    sizes = ", ".join(
        f"{1e3 * c['s_per_step']:.1f} ms in {c['gaps_per_step']:g} gaps {k}" for k, c in idle["by_size"].items()
    )
    text = f"idle between its kernels {1e3 * idle['idle_s_per_step']:.1f} ms ({sizes})"
    if idle["largest"]:
        worst = idle["largest"][0]
        text += f", the longest {worst['us'] / 1e3:.2f} ms after {worst['after'][:60]}"
    return text
