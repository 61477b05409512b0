"""``gemma4-onnx report``: several parity runs side by side, as report.md and a self-contained report.html.

Each input is a directory holding a ``parity.json`` (fp32, int8, int4, …). The HTML draws its plots as
inline SVG, so it opens offline and fetches nothing: per-layer cosine along depth (which layers hurt),
KL and top-1 per run, bits per byte, and package size by file with the PLE file apart.
"""

import html
import os
from pathlib import Path
from typing import Any

from gemma4_onnx.atomic import check_disjoint, publish_dir
from gemma4_onnx.errors import UsageError
from gemma4_onnx.runtime.margins import THIN, gate_margins, status
from gemma4_onnx.schema import SchemaError, list_of, loads_json, nullable, number, record, string
from gemma4_onnx.user_files import read_own_file, regular_file

MAX_PARITY_BYTES = 64 << 20
FINITE = number(-1e300, 1e300)
# What the report reads of a parity.json (``gemma4-onnx parity`` writes more).
PARITY = record({"blocks": list_of(record({"name": string(max_length=256), "cosine": FINITE}), max_length=1 << 12)}, {
    "text": nullable(record({key: FINITE for key in (
        "kl_mean", "top1_agreement", "bits_per_byte_onnx", "bits_per_byte_reference", "greedy_match_steps",
        "greedy_steps")})),
    "size": nullable(record(optional={key: FINITE for key in (
        "avg_bits_per_linear_weight", "total_bytes", "ple_bytes")})),
    "quantization": nullable(record(optional={"recipe": nullable(string(max_length=256))})),
    "precision": nullable(string(max_length=256)),
    "checkpoint": nullable(string()),
})
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


def read_parity_file(named: Path, path: Path) -> bytes:
    """The parity.json of a folder the user named (through no link), or the file the user named."""
    if named.is_dir():
        return read_own_file(named, path.name, MAX_PARITY_BYTES)
    regular_file(path, "report input")
    with path.open("rb") as f:
        return f.read(MAX_PARITY_BYTES + 1)


def load_runs(directories: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for directory in directories:
        path = directory / "parity.json" if directory.is_dir() else directory
        if not os.path.lexists(path):
            raise UsageError(f"{directory}: no parity.json (run gemma4-onnx parity --out {directory} first)")
        try:
            result = loads_json(read_parity_file(directory, path))
            PARITY(result, "")
        except SchemaError as exc:
            raise UsageError(f"{path}: not a gemma4-onnx parity report: {exc}") from None
        except ValueError as exc:
            raise UsageError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
        quantization = result.get("quantization") or {}
        result["label"] = quantization.get("recipe") or result.get("precision") or path.parent.name
        runs.append(result)
    return runs


def _row(run: dict[str, Any]) -> dict[str, Any]:
    text, size = run.get("text"), run.get("size") or {}
    worst = min(run["blocks"], key=lambda b: b["cosine"]) if run["blocks"] else None
    return {
        "run": run["label"],
        "KL (nats)": f"{text['kl_mean']:.3g}" if text else "- (blocks only)",
        "top-1": f"{text['top1_agreement']:.4f}" if text else "-",
        "bits/byte": f"{text['bits_per_byte_onnx']:.4f} (float {text['bits_per_byte_reference']:.4f})" if text else "-",
        "greedy": f"{text['greedy_match_steps']}/{text['greedy_steps']}" if text else "-",
        "bits/linear weight": f"{size.get('avg_bits_per_linear_weight', 32.0):.2f}",
        "total MB": f"{size.get('total_bytes', 0) / 1e6:.2f}",
        "PLE MB": f"{size.get('ple_bytes', 0) / 1e6:.2f}",
        "worst block": f"{worst['name']} ({worst['cosine']:.6f})" if worst else "-",
    }


MARGIN_HEADER = ("run", "gate", "value", "threshold", "margin", "left", "status")


def _margin_rows(runs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Each run's gates (``margins.gate_margins``): value, threshold, distance to it, share of it left."""
    rows: list[tuple[str, ...]] = []
    for run in runs:
        for m in gate_margins(run):
            rows.append((run["label"], f"{m['gate']} {m['direction']}", f"{m['value']:.4g}",
                         f"{m['threshold']:.4g}", f"{m['margin']:+.3g}", f"{100 * m['left']:.0f} %", status(m)))
    return rows


def markdown(runs: list[dict[str, Any]]) -> str:
    rows = [_row(r) for r in runs]
    header = list(rows[0])
    lines = ["# Parity report", "", f"Checkpoint: `{runs[0].get('checkpoint', '?')}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    if margins := _margin_rows(runs):
        lines += ["", f"## Gates and margins (thin: less than {THIN:.0%} of the gate left)", "",
                  "| " + " | ".join(MARGIN_HEADER) + " |", "|" + "---|" * len(MARGIN_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in margins]
    lines += ["", "## Per-layer cosine (block output vs transformers, reference inputs)", "",
              "| layer | " + " | ".join(r["label"] for r in runs) + " |", "|" + "---|" * (len(runs) + 1)]
    for i, block in enumerate(runs[0]["blocks"]):
        values = [f"{r['blocks'][i]['cosine']:.6f}" if i < len(r["blocks"]) else "-" for r in runs]
        lines.append(f"| {block['name']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _line_chart(title: str, series: list[tuple[str, list[float]]], y_label: str) -> str:
    width, height, pad = 760, 260, 48
    values = [v for _, ys in series for v in ys] or [0.0]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1e-9, high + 1e-9
    count = max(len(ys) for _, ys in series) or 1

    def point(i: int, v: float) -> str:
        x = pad + (width - 3 * pad) * (i / max(count - 1, 1))
        y = height - pad - (height - 2 * pad) * ((v - low) / (high - low))
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{pad}" y="20" font-size="14">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="4" y="{pad}" font-size="10">{high:.6g}</text>',
             f'<text x="4" y="{height - pad}" font-size="10">{low:.6g}</text>',
             f'<text x="{width / 2}" y="{height - 8}" font-size="11">{html.escape(y_label)}</text>']
    for k, (name, ys) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        points = " ".join(point(i, v) for i, v in enumerate(ys))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{width - 2 * pad + 8}" y="{pad + 14 * k}" font-size="11" fill="{color}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bar_chart(title: str, bars: list[tuple[str, float]], unit: str) -> str:
    width, row = 640, 22
    height = 30 + row * len(bars)
    top = max((v for _, v in bars), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">', f'<text x="0" y="16" font-size="14">{html.escape(title)}</text>']
    for i, (name, value) in enumerate(bars):
        y = 26 + i * row
        length = 360 * value / top
        parts.append(f'<text x="0" y="{y + 14}" font-size="11">{html.escape(name)}</text>')
        parts.append(f'<rect x="200" y="{y}" width="{length:.1f}" height="{row - 6}" '
                     f'fill="{COLORS[i % len(COLORS)]}"/>')
        parts.append(f'<text x="{206 + length:.1f}" y="{y + 13}" font-size="11">{value:.4g} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(runs: list[dict[str, Any]]) -> str:
    rows = [_row(r) for r in runs]
    header = list(rows[0])
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(str(r[h]))}</td>" for h in header) + "</tr>"
                     for r in rows) + "</table>"
    if margins := _margin_rows(runs):
        table += (f"<h2>Gates and margins (thin: less than {THIN:.0%} of the gate left)</h2><table><tr>"
                  + "".join(f"<th>{html.escape(h)}</th>" for h in MARGIN_HEADER) + "</tr>"
                  + "".join(f"<tr class='{html.escape(row[-1])}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                            + "</tr>" for row in margins) + "</table>")
    depth = _line_chart("Per-layer cosine along depth (1 = identical to transformers)",
                        [(r["label"], [b["cosine"] for b in r["blocks"]]) for r in runs], "decoder layer")
    texts = [(r["label"], r["text"]) for r in runs if r.get("text")]  # block-only runs have no text section
    kl = _bar_chart("KL(reference || onnx), mean over positions", [(n, t["kl_mean"]) for n, t in texts], "nats")
    top1 = _bar_chart("Top-1 agreement", [(n, t["top1_agreement"]) for n, t in texts], "")
    bpb = _bar_chart("Bits per byte of the evaluated text", [(n, t["bits_per_byte_onnx"]) for n, t in texts], "bits/B")
    sizes = []
    for r in runs:
        size = r.get("size") or {}
        ple = size.get("ple_bytes", 0)
        sizes += [(f"{r['label']}: PLE file", ple / 1e6),
                  (f"{r['label']}: everything else", (size.get("total_bytes", 0) - ple) / 1e6)]
    size_chart = _bar_chart("Package size (PLE file shown apart)", sizes, "MB")
    body = "".join(f"<section>{chart}</section>" for chart in (depth, kl, top1, bpb, size_chart))
    style = ("body{font-family:sans-serif;margin:2em;max-width:900px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}section{margin:1.5em 0}"
             "tr.thin td{background:#fff3cd}tr.FAILED td{background:#f8d7da}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gemma4-onnx parity report</title>"
            f"<style>{style}</style></head><body><h1>Parity report</h1>"
            f"<p>Checkpoint: <code>{html.escape(str(runs[0].get('checkpoint', '?')))}</code></p>{table}{body}"
            "</body></html>\n")


def write_report(directories: list[Path], out: Path, force: bool = False) -> Path:
    """report.md and report.html of ``directories``' runs, published whole at ``out`` (a non-empty ``out``
    replaced only with ``force``; an ``out`` that is, lies in or contains an input refused)."""
    runs = load_runs(directories)
    if not runs:
        raise UsageError("report needs at least one parity directory")
    check_disjoint(out, *directories)
    pages = {"report.md": markdown(runs), "report.html": html_report(runs)}
    with publish_dir(out, force=force) as staging:
        for name, text in pages.items():
            (staging / name).write_text(text, encoding="utf-8")
    return out
