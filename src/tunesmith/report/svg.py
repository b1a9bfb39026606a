"""Inline SVG plots, drawn in Python so report.html needs nothing from the network.

Every plot is an `<svg class="plot KIND" data-points="N">` (N: the points or bars drawn), so a test or a
browser check can tell an empty plot from a drawn one. Every text that comes from data is escaped here.
"""

from __future__ import annotations

import math
from html import escape

W, H = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 40
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(hi) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def line_plot(title: str, series: dict[str, list[tuple[float, float]]], kind: str, xlabel: str = "step",
              ylabel: str = "") -> str:
    """Lines (with a dot per point) of named series over a shared x axis; non-finite points are left out."""
    series = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
              for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    points = sum(len(p) for p in series.values())
    head = (f'<svg class="plot {escape(kind)}" data-points="{points}" viewBox="0 0 {W} {H}" width="{W}" '
            f'height="{H}" role="img" aria-label="{escape(title)}">'
            f'<text x="{W / 2}" y="18" text-anchor="middle" class="title">{escape(title)}</text>')
    if not points:
        return head + f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text></svg>'
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    (x0, x1), (y0, y1) = _range(xs), _range(ys)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + ph - (y - y0) / (y1 - y0) * ph

    out = [head, f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="frame"/>']
    for i in range(5):  # y grid and labels
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>'
                   f'<text x="{LEFT - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{_num(y)}</text>')
    for x in (x0, (x0 + x1) / 2, x1):
        out.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{_num(x)}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 4}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{TOP + ph / 2}" transform="rotate(-90 12 {TOP + ph / 2})" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{color}" class="point">'
                   f'<title>{escape(name)}: step {_num(x)}, {_num(y)}</title></circle>' for x, y in pts)
        out.append(f'<text x="{LEFT + 8 + 150 * i}" y="{TOP + 14}" fill="{color}">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_plot(title: str, bars: list[tuple[str, float]], kind: str, ylabel: str = "") -> str:
    """Vertical bars with their labels below (a histogram's bins, or a few named values)."""
    bars = [(label, float(v)) for label, v in bars if math.isfinite(float(v))]
    head = (f'<svg class="plot {escape(kind)}" data-points="{len(bars)}" viewBox="0 0 {W} {H}" width="{W}" '
            f'height="{H}" role="img" aria-label="{escape(title)}">'
            f'<text x="{W / 2}" y="18" text-anchor="middle" class="title">{escape(title)}</text>')
    if not bars:
        return head + f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text></svg>'
    top = max(max(v for _, v in bars), 1e-12)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    width = pw / len(bars)
    out = [head, f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="frame"/>',
           f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{_num(top)}</text>',
           f'<text x="{LEFT - 4}" y="{TOP + ph + 4}" text-anchor="end">0</text>']
    if ylabel:
        out.append(f'<text x="12" y="{TOP + ph / 2}" transform="rotate(-90 12 {TOP + ph / 2})" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')
    every = max(1, math.ceil(len(bars) / 10))  # at most ~10 labels, so they do not overlap
    for i, (label, v) in enumerate(bars):
        h = v / top * ph
        x = LEFT + i * width
        out.append(f'<rect x="{x + 1:.1f}" y="{TOP + ph - h:.1f}" width="{max(width - 2, 1):.1f}" height="{h:.1f}" '
                   f'fill="{COLORS[0]}" class="bar"><title>{escape(label)}: {_num(v)}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{x + width / 2:.1f}" y="{TOP + ph + 16}" text-anchor="middle">'
                       f'{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(title: str, labels: list[str], counts: list[list[int]], kind: str = "confusion") -> str:
    """A square matrix of counts (rows: true label, columns: predicted), each cell shaded by its share of its row."""
    n = len(labels)
    cell = min(48, (min(W, H + 160) - 120) / max(n, 1))
    size_w, size_h = 120 + cell * n + 16, 60 + cell * n + 30
    out = [f'<svg class="plot {escape(kind)}" data-points="{n * n}" viewBox="0 0 {size_w:.0f} {size_h:.0f}" '
           f'width="{size_w:.0f}" height="{size_h:.0f}" role="img" aria-label="{escape(title)}">'
           f'<text x="{size_w / 2:.0f}" y="18" text-anchor="middle" class="title">{escape(title)}</text>'
           f'<text x="{120 + cell * n / 2:.0f}" y="36" text-anchor="middle">predicted</text>']
    for j, name in enumerate(labels):
        out.append(f'<text x="{120 + cell * (j + 0.5):.1f}" y="52" text-anchor="middle">{escape(name[:8])}</text>')
    for i, (name, row) in enumerate(zip(labels, counts)):
        total = sum(row) or 1
        y = 60 + cell * i
        out.append(f'<text x="114" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{escape(name[:14])}</text>')
        for j, c in enumerate(row):
            share = c / total
            out.append(f'<rect x="{120 + cell * j:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                       f'fill="rgba(31,119,180,{0.08 + 0.9 * share:.3f})" class="cell"><title>true {escape(name)}, '
                       f'predicted {escape(labels[j])}: {c}</title></rect>'
                       f'<text x="{120 + cell * (j + 0.5):.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle">'
                       f'{c}</text>')
    out.append(f'<text x="{120 + cell * n / 2:.0f}" y="{size_h - 8:.0f}" text-anchor="middle">rows: true label</text>')
    out.append("</svg>")
    return "".join(out)
