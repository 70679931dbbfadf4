"""`attnkern bench` reports: the text table, markdown, CSV and the PNG plot."""

from __future__ import annotations

import csv
from typing import Dict, List, Sequence

from .cases import PROVIDERS

# ----------------------------------------------------------------------------------------------
# Reports: text table, markdown, CSV, plot

_COLUMNS = ("provider", "ms", "GB/s", "%limit", "GFLOP/s", "x ref", "x sdpa", "x compile",
            "peak MiB", "compile s", "check")


def _row(r: dict) -> List[str]:
    if r.get("status") != "ok":
        return [r["provider"]] + ["-"] * (len(_COLUMNS) - 2) + [r.get("status", "?")]
    sp = r.get("speedup_vs", {})

    def fx(b):
        return "%.2f" % sp[b] if b in sp else "-"
    peak = r.get("peak_mem_bytes")
    return [
        r["provider"] if r["provider"] != "limit" else "limit (%s)" % r.get("method", ""),
        "%.3f" % r["median_ms"], "%.1f" % r["gbps"], "%.0f%%" % (100 * r["frac_of_limit"]),
        "%.1f" % r["gflops"] if "gflops" in r else "-",
        fx("reference"), fx("sdpa"), fx("compile"),
        "%.1f" % (peak / 2**20) if peak is not None else "-",
        "%.1f" % r["compile_s"] if "compile_s" in r else "-",
        r.get("check", "-"),
    ]


def _case_title(r: dict) -> str:
    s = r["shape"]
    return "%s %s %s %s  (B=%d N=%d H=%d L=%d Dk=%d Dv=%d, %s, %.1f MB moved)" % (
        s["name"], s["lengths"], r["dtype"], r["mode"], s["B"], s["N"], s["H"], s["L"],
        s["Dk"], s["Dv"], s["layout"], r["bytes"] / 1e6)


def _group(records: Sequence[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        k = (r["shape"]["name"], r["shape"]["lengths"], r["dtype"], r["mode"])
        groups.setdefault(k, []).append(r)
    return groups


def format_table(records: Sequence[dict]) -> str:
    """The plain-text table `attnkern bench` prints: one block per case, the limit first."""
    lines = []
    for rs in _group(records).values():
        lines.append(_case_title(rs[0]))
        rows = [list(_COLUMNS)] + [_row(r) for r in rs]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        for row in rows:
            lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        for r in rs:
            if r.get("status") != "ok":
                lines.append("  %s %s: %s" % (r["provider"], r.get("status"), r.get("reason", "")))
        lines.append("")
    return "\n".join(lines)


def format_markdown(records: Sequence[dict]) -> str:
    """One markdown table of every timed provider (the results tables of docs/benchmarks.md)."""
    # Peak memory is measured on CUDA only: drop the column when no record has it.
    keep = [i for i, c in enumerate(_COLUMNS)
            if c != "peak MiB" or any(r.get("peak_mem_bytes") is not None for r in records)]
    head = ["shape", "lengths", "dtype", "mode"] + [_COLUMNS[i] for i in keep]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        s = r["shape"]
        row = _row(r)
        out.append("| " + " | ".join([s["name"], s["lengths"], r["dtype"], r["mode"]]
                                     + [row[i] for i in keep]) + " |")
    return "\n".join(out) + "\n"


_CSV_FIELDS = ("key", "op", "provider", "mode", "shape", "B", "N", "H", "L", "Dk", "Dv", "layout",
               "lengths", "total_len", "dtype", "device", "device_name", "threads", "torch_version",
               "attnkern_version", "status", "median_ms", "min_ms", "reps", "bytes", "gbps",
               "frac_of_limit", "gflops", "speedup_vs_reference", "speedup_vs_sdpa",
               "speedup_vs_compile", "peak_mem_bytes", "compile_s", "check", "max_err", "reason")


def write_csv(records: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            flat = dict(r)
            flat.update({k: v for k, v in r["shape"].items() if k != "name"})
            flat["shape"] = r["shape"]["name"]
            for b, v in r.get("speedup_vs", {}).items():
                flat["speedup_vs_" + b] = v
            w.writerow(flat)


def plot_results(records: Sequence[dict], path: str) -> None:
    """Bar chart of median time per provider per shape (log scale), one panel per
    (device, dtype, mode); a black tick marks the machine's limit for the same bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Dict[tuple, List[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            panels.setdefault((r["device_name"], r["dtype"], r["mode"]), []).append(r)
    if not panels:
        raise ValueError("no timed records to plot")
    providers = [p for p in PROVIDERS if any(r["provider"] == p for rs in panels.values() for r in rs)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.5, 3.7 + 1.6 * max(
        len({(r["shape"]["name"], r["shape"]["lengths"]) for r in rs}) for rs in panels.values())),
        3.6 * len(panels)), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, ((dev, dtype, mode), rs) in zip(axes[:, 0], sorted(panels.items())):
        cases = sorted({(r["shape"]["name"], r["shape"]["lengths"]) for r in rs})
        t = {(r["shape"]["name"], r["shape"]["lengths"], r["provider"]): r["median_ms"] for r in rs}
        for j, p in enumerate(providers):
            xs = [i + (j - (len(providers) - 1) / 2) * width for i, c in enumerate(cases) if c + (p,) in t]
            ys = [t[c + (p,)] for c in cases if c + (p,) in t]
            if xs:
                ax.bar(xs, ys, width, label=p)
        lx = [i for i, c in enumerate(cases) if c + ("limit",) in t]
        ax.hlines([t[cases[i] + ("limit",)] for i in lx], [i - 0.45 for i in lx],
                  [i + 0.45 for i in lx], colors="black", label="limit (same bytes)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(["%s\n%s" % c for c in cases], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title("attention_pool %s %s on %s" % (mode, dtype, dev), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
