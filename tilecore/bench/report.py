"""The benchmark's outputs: bench.json (everything), bench.md (tables) and PNG plots (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

from tilecore.runtime.artifacts import atomic_write, atomic_write_json

STAGE_GROUPS = ("decode", "preprocess", "tiling", "engine", "knn", "maps", "merge")


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def name(row: dict) -> str:
    return f"{row['backend']} {row['precision']}"


def speed_table(rows: list[dict]) -> list[str]:
    batches = sorted({b for r in rows for b in r.get("throughput", {})}, key=int)
    head = ["setup", "backend", "b1 p50 / p90 / p99 ms", *(f"img/s b{b}" for b in batches)]
    head += ["img/s with decode", "backbone-only img/s", "efficiency", "peak RSS MB", "throughput ratios"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {name(r)} | not measured: {r['error']} |" + " |" * (len(head) - 3))
            continue
        lat, big = r["latency_batch1"], max(r["throughput"], key=int)
        ratios = ", ".join(f"{k.removeprefix('vs_')} ×{v}" for k, v in r.get("ratios", {}).items() if k != "batch")
        cells = [
            r["label"],
            name(r),
            f"{lat['p50_ms']:.1f} / {lat['p90_ms']:.1f} / {lat['p99_ms']:.1f}",
            *(fmt(r["throughput"].get(b)) for b in batches),
            f"{fmt(r['throughput_with_decode'][big])} (b{big})",
            f"{fmt(r['backbone_only'].get(big))} (b{big})" if r["backbone_only"] else "—",
            fmt(r["efficiency"].get(big), 2) if r["efficiency"] else "—",
            fmt(r["memory"]["peak_rss_mb"], 0),
            ratios or "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stage_table(rows: list[dict]) -> list[str]:
    head = ["setup", "backend", *(f"{g} ms" for g in STAGE_GROUPS), "stage sum / end-to-end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stages = r.get("stages_batch1", {})
        if "groups_ms" not in stages:
            continue
        groups = {**stages["groups_ms"], "decode": stages["decode_ms"]}
        cells = [r["label"], name(r), *(fmt(groups.get(g), 2) for g in STAGE_GROUPS)]
        cells.append(f"{stages['stage_sum_ms']:.1f} / {stages['end_to_end_ms']:.1f} ms")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cascade_table(rows: list[dict]) -> list[str]:
    """Per cascade bundle: images and tiles each stage ran, and throughput against the full ensemble."""
    head = ["setup", "backend", "batch", "images / tiles per stage", "fine tiles run", "img/s cascade", "img/s full",
            "speed-up"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.get("cascade")
        if c is None:
            continue
        per_stage = ", ".join(f"{s['images']} / {s['tiles']}" for s in c["stages"])
        rates = c["images_per_second"]
        cells = [
            r["label"],
            name(r),
            str(c["batch"]),
            per_stage,
            f"{c['fine_tiles_run_share']:.0%}",
            "/".join(fmt(x) for x in rates["cascade"]),
            "/".join(fmt(x) for x in rates["full"]),
            f"×{c['speedup']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_table(sweep: list[dict]) -> list[str]:
    head = ["setup", "image px", "tiles", "peak RSS MB", "RSS after load MB", "before load MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sweep:
        if "error" in r:
            lines.append(f"| {r['label']} | {r.get('size', '')} | not measured: {r['error']} | | | |")
            continue
        m = r["memory"]
        cells = [r["setup"], r["size"], r["tiles"], m["peak_rss_mb"], m["rss_after_load_mb"], m["rss_before_load_mb"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def markdown(report: dict) -> str:
    p = report["protocol"]
    parts = [
        f"Machine: {report['machine']}; threads {report['threads']}; inputs: {report['inputs']}.",
        f"Protocol: {p['warmup']} warm-up calls, then each figure over ≥ {p['min_images']} images or "
        f"{p['duration_s']} s; throughput from the median call; engine calls of ≤ {p['max_batch']} tiles.",
        "",
        *speed_table(report["rows"]),
    ]
    if any("groups_ms" in r.get("stages_batch1", {}) for r in report["rows"]):
        parts += ["", "Stages at batch 1 (median ms per image):", "", *stage_table(report["rows"])]
    if any("cascade" in r for r in report["rows"]):
        parts += ["", "Early-exit cascades on these inputs (A/B/A/B; the rows above measure the cascade):", ""]
        parts += cascade_table(report["rows"])
    if report.get("memory_sweep"):
        parts += ["", "Memory vs input resolution (one process per row, two images scored):", ""]
        parts += memory_table(report["memory_sweep"])
    parts += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(parts) + "\n"


def plot(report: dict, out: Path) -> list[str]:
    """PNG plots next to bench.json; none (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.setdefault("notes", []).append("matplotlib is not installed: no plots (pip install 'tilecore[bench]')")
        return []
    rows = [r for r in report["rows"] if "error" not in r]
    written = []
    if rows:
        labels = [f"{r['label']}\n{name(r)}" for r in rows]
        big = [max(r["throughput"], key=int) for r in rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(rows) + 4), 4.5))
        left.bar(labels, [r["latency_batch1"]["p50_ms"] for r in rows], color="tab:blue")
        left.set_ylabel("latency at batch 1, p50 (ms)")
        right.bar(labels, [r["throughput"][b] for r, b in zip(rows, big, strict=True)], color="tab:green")
        right.set_ylabel(f"throughput at batch {big[0]} (images/s)")
        for axis in (left, right):
            axis.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        written.append(save(fig, out / "latency_throughput.png", plt))
        staged = [r for r in rows if "groups_ms" in r.get("stages_batch1", {})]
        if staged:
            fig, axis = plt.subplots(figsize=(8, 0.5 * len(staged) + 1.5))
            lefts = [0.0] * len(staged)
            for group in STAGE_GROUPS:
                values = [
                    {**r["stages_batch1"]["groups_ms"], "decode": r["stages_batch1"]["decode_ms"]}.get(group, 0.0)
                    for r in staged
                ]
                axis.barh([f"{r['label']} {name(r)}" for r in staged], values, left=lefts, label=group)
                lefts = [a + b for a, b in zip(lefts, values, strict=True)]
            axis.set_xlabel("ms per image at batch 1 (median)")
            axis.legend(fontsize=7, ncol=len(STAGE_GROUPS), loc="upper center", bbox_to_anchor=(0.5, -0.25))
            fig.tight_layout()
            written.append(save(fig, out / "stages.png", plt))
    sweep = [r for r in report.get("memory_sweep", []) if "error" not in r]
    if sweep:
        fig, axis = plt.subplots(figsize=(6, 4))
        for setup in dict.fromkeys(r["setup"] for r in sweep):
            points = sorted((r["size"], r["memory"]["peak_rss_mb"]) for r in sweep if r["setup"] == setup)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=setup)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("input resolution (px)")
        axis.set_ylabel("peak RSS of the runtime process (MB)")
        axis.legend()
        fig.tight_layout()
        written.append(save(fig, out / "memory_vs_resolution.png", plt))
    return written


def save(fig, path: Path, plt) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path.name


def write_report(report: dict, out: Path) -> list[str]:
    """Write bench.json, bench.md and the plots into `out`; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot(report, out)
    atomic_write_json(out / "bench.json", report)
    text = markdown(report)
    atomic_write(out / "bench.md", lambda tmp: tmp.write_text(text))
    return ["bench.json", "bench.md", *report["plots"]]
