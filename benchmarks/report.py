"""Render pytest-benchmark JSON (from ``pytest benchmarks/ --benchmark-json X``) to markdown + PNG.

    python -m benchmarks.report results.json [more.json ...] [--out DIR]

Writes ``DIR/<stem>.md`` (default DIR: next to the first JSON) with, per op and problem, a table of
median time, ratio vs fastvq, peak memory, search TFLOP/s (2*N*K*D / median) and the
out-of-memory / skip / error rows (``fastvq_outcomes``, recorded by conftest), plus one PNG per
op and problem with time vs K and peak memory vs K per provider (log scales).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

OP_TITLES = {
    "search": "Search only (nearest code, no autograd)",
    "fwd": "Forward (search + gather + loss, autograd on)",
    "fwdbwd": "Forward + backward",
    "ema": "One EMA training step (forward with EMA update + backward)",
    "model": "VQ-VAE training step (Adam; N = batch of 28x28 images, 49 latents each)",
}
OP_ORDER = list(OP_TITLES)
PROVIDER_ORDER = [
    "fastvq-triton",
    "fastvq-torch",
    "naive",
    "naive-compile",
    "vqp-train",
    "vqp-eval",
    "faiss",
    "matmul",
]
REFERENCES = ("fastvq-triton", "fastvq-torch")  # "vs fastvq" compares with the first present
GiB = 1 << 30


def load_rows(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """Flatten benchmark entries and recorded outcomes into one row per cell."""
    rows, metas = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        metas.append(data)
        for b in data.get("benchmarks", []):
            ei = b.get("extra_info", {})
            if "op" not in ei:
                continue
            med = b["stats"]["median"]
            rows.append(_row(ei, status="ok", median=med, rounds=b["stats"]["rounds"]))
        for o in data.get("fastvq_outcomes", []):
            ei = o.get("extra_info", {})
            if "op" in ei:
                rows.append(_row(ei, status=o["status"], reason=o.get("reason", "")))
    return rows, metas


def _row(ei: dict, **kw) -> dict:
    r = {k: ei.get(k) for k in ("op", "provider", "N", "K", "D", "dtype", "device")}
    r.update(device_name=ei.get("device_name", ei.get("device")), peak=ei.get("peak_mem_bytes"))
    r.update(flops=ei.get("search_flops"), reason="", median=None, rounds=None)
    r.update(kw)
    if r["median"] and r["flops"]:
        r["tflops"] = r["flops"] / r["median"] / 1e12
    else:
        r["tflops"] = None
    return r


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}×"


def _porder(p: str) -> int:
    return PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _problem_key(r: dict):
    return (r["device_name"], OP_ORDER.index(r["op"]), r["N"], r["D"], r["dtype"])


def _reference(rows: list[dict]) -> dict | None:
    for name in REFERENCES:
        for r in rows:
            if r["provider"] == name and r["status"] == "ok":
                return r
    return None


def _short_reason(reason: str) -> str:
    """Shorten allocator messages: '... you tried to allocate 4294967296 bytes ...' -> '4 GiB'."""
    m = re.search(r"tried to allocate (\d+) bytes", reason)
    if m:
        head = reason.split(": RuntimeError")[0].split(": torch.OutOfMemoryError")[0]
        return f"{head} (a {_fmt_bytes(int(m.group(1)))} allocation failed)"
    return reason


def _note(r: dict) -> str:
    if r["status"] == "ok":
        return ""
    note = f"**{r['status']}**: {_short_reason(r['reason'])}"
    return note.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[dict]) -> list[str]:
    """One markdown table for one problem family (fixed op, device, N, D, dtype), K ascending."""
    out = [
        "| K | provider | median | time vs fastvq | peak memory | memory vs fastvq "
        "| search TFLOP/s | note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    by_k = defaultdict(list)
    for r in rows:
        by_k[r["K"]].append(r)
    for k in sorted(by_k):
        group = sorted(by_k[k], key=lambda r: _porder(r["provider"]))
        ref = _reference(group)
        for r in group:
            if r["status"] == "skip":
                continue  # listed once per section under "not run"
            t_ratio = m_ratio = None
            if ref is not None and r["status"] == "ok":
                t_ratio = r["median"] / ref["median"]
                if r["peak"] and ref["peak"]:
                    m_ratio = r["peak"] / ref["peak"]
            tfl = "—" if r["tflops"] is None else f"{r['tflops']:.3g}"
            out.append(
                f"| {k} | {r['provider']} | {_fmt_time(r['median'])} | {_fmt_ratio(t_ratio)} "
                f"| {_fmt_bytes(r['peak'])} | {_fmt_ratio(m_ratio)} | {tfl} | {_note(r)} |"
            )
    return out


def _skips(rows: list[dict]) -> list[str]:
    seen = {}
    for r in rows:
        if r["status"] == "skip":
            seen.setdefault((r["provider"], r["reason"]), []).append(r["K"])
    return [
        f"- not run: `{p}` at K={','.join(map(str, sorted(set(ks))))}: {reason}"
        for (p, reason), ks in sorted(seen.items(), key=lambda kv: _porder(kv[0][0]))
    ]


def plot_family(rows: list[dict], title: str, path: Path) -> bool:
    """Time vs K and peak memory vs K, one line per provider, log-log. False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    failed = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            series[r["provider"]].append(r)
        elif r["status"] in ("oom", "timeout", "error"):
            failed[r["provider"]].append(f"{r['status']} at K={r['K']}")
    if not series:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in sorted(set(series) | set(failed), key=_porder):
        pts = sorted(series.get(p, []), key=lambda r: r["K"])
        label = p + (f" ({', '.join(failed[p])})" if failed.get(p) else "")
        if not pts:
            ax_t.plot([], [], "x", label=label)
            continue
        ks = [r["K"] for r in pts]
        (line,) = ax_t.plot(ks, [r["median"] for r in pts], "o-", label=label)
        mem = [(r["K"], r["peak"]) for r in pts if r["peak"]]
        if mem:
            ax_m.plot(*zip(*mem, strict=True), "o-", color=line.get_color(), label=p)
    for ax, ylabel in ((ax_t, "median time [s]"), (ax_m, "peak memory [bytes]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size K")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _more_less(ratio: float, good: str, bad: str) -> str:
    """2.0 -> '2× <good>', 0.5 -> '2× <bad>'."""
    return f"{ratio:.3g}× {good}" if ratio >= 1 else f"{1 / ratio:.3g}× {bad}"


def headline(rows: list[dict]) -> list[str]:
    """The comparisons the project tracks, stated from the data (never asserted)."""
    out = []
    idx = {
        (r["device"], r["op"], r["provider"], r["N"], r["K"], r["D"], r["dtype"]): r for r in rows
    }
    order = lambda kv: (kv[0][0], OP_ORDER.index(kv[0][1]), kv[0][3], kv[0][5], kv[0][6], kv[0][4])
    for (dev, op, prov, n, k, d, dt), r in sorted(idx.items(), key=order):
        if prov not in REFERENCES or r["status"] != "ok":
            continue
        if prov == "fastvq-torch" and (dev, op, "fastvq-triton", n, k, d, dt) in idx:
            if idx[(dev, op, "fastvq-triton", n, k, d, dt)]["status"] == "ok":
                continue
        peers = {"search": ["faiss"], "model": ["vqp-train"]}.get(op, ["vqp-train", "naive"])
        for peer in peers:
            q = idx.get((dev, op, peer, n, k, d, dt))
            if q is None or q["status"] == "skip":
                continue
            where = f"{op} {'B' if op == 'model' else 'N'}={n} K={k} D={d} {dt} ({dev})"
            if q["status"] != "ok":
                out.append(
                    f"- {where}: `{peer}` {q['status']} ({_short_reason(q['reason'])}); `{prov}` "
                    f"{_fmt_time(r['median'])}, peak {_fmt_bytes(r['peak'])}"
                )
                continue
            speed = q["median"] / r["median"]
            line = f"- {where}: `{prov}` is {_more_less(speed, 'faster', 'slower')}"
            line += f" than `{peer}` ({_fmt_time(r['median'])} vs {_fmt_time(q['median'])})"
            if r["peak"] and q["peak"]:
                line += f", peak memory {_fmt_bytes(r['peak'])} vs {_fmt_bytes(q['peak'])}"
                line += f" ({_more_less(q['peak'] / r['peak'], 'less', 'more')})"
            out.append(line)
    return out


def render(paths: list[Path], out_dir: Path, name: str | None = None) -> Path:
    rows, metas = load_rows(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or Path(paths[0]).stem
    md = [f"# fastvq benchmarks: {stem}", ""]
    for p, meta in zip(paths, metas, strict=True):
        mi, ci = meta.get("machine_info", {}), meta.get("commit_info", {})
        cpu = mi.get("cpu", {}).get("brand_raw", "?")
        dirty = " (dirty tree)" if ci.get("dirty") else ""
        md.append(
            f"- `{Path(p).name}`: {meta.get('datetime', '?')}, commit "
            f"`{str(ci.get('id', '?'))[:10]}`{dirty}, CPU {cpu}, grid "
            f"`{meta.get('fastvq_grid', '?')}`, command `{meta.get('fastvq_command', '?')}`"
        )
    devices = sorted({r["device_name"] for r in rows if r["device_name"]})
    md += [f"- devices: {', '.join(devices)}", ""]
    md += [
        "Median of the timed rounds; *vs fastvq* divides by fastvq's median (triton on CUDA, "
        "torch otherwise) of the same problem (>1: slower / more memory than fastvq). Peak memory: "
        "CUDA `max_memory_allocated`; CPU RSS growth (inputs and state + one call's high-water "
        "mark), measured in the worker process. TFLOP/s counts only the 2·N·K·D search FLOPs.",
        "",
    ]
    heads = headline(rows)
    if heads:
        md += ["## Headline comparisons", "", *heads, ""]
    families = defaultdict(list)
    for r in rows:
        families[_problem_key(r)].append(r)
    for key in sorted(families):
        dev_name, op_i, n, d, dt = key
        fam = families[key]
        op = OP_ORDER[op_i]
        title = f"{OP_TITLES[op]}: {'B' if op == 'model' else 'N'}={n}, D={d}, {dt}, {dev_name}"
        md += [f"## {title}", ""]
        md += render_table(fam)
        md += ["", *_skips(fam)]
        dev = fam[0]["device"]
        png = out_dir / f"{stem}-{op}-{dev}-N{n}-D{d}-{dt}.png"
        if plot_family(fam, title, png):
            md += ["", f"![{op} N={n} D={d} {dt}]({png.name})"]
        md.append("")
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: JSON's)")
    ap.add_argument("--name", default=None, help="file stem of the outputs (default: JSON's)")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else args.json[0].parent
    print(render(args.json, out, args.name))


if __name__ == "__main__":
    main()
