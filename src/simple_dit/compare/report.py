"""The report of a comparison: the quality and loss figures, each preset's sample grid, and
``report.md``, the self-contained ``report.html`` and ``results.json`` written from the collected
results, with the number formatting they share."""

from __future__ import annotations

import base64
import html
import math
import shutil
from pathlib import Path

from ..io import atomic_write, write_json

GRID_PER_CLASS = 8


def _style(presets: list[dict]):
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    dashes = ["-", "--", ":", "-."]
    styles = {}
    for i, entry in enumerate(presets):
        for j, run in enumerate(entry["runs"]):
            best = run["lr"] == entry["best_lr"]
            styles[(entry["preset"], run["lr"])] = dict(
                color=colours[i % len(colours)], linestyle=dashes[j % len(dashes)], linewidth=2.2 if best else 1.2,
                alpha=1.0 if best else 0.75, marker="o", markersize=4 if best else 3,
                label=f"{entry['preset']} lr={run['lr']:g}" + (" (best)" if best else ""),
            )  # fmt: skip
    return styles


_X_AXES = {
    "images": ("training images seen", lambda entry, e: e["images_seen"]),
    "seconds": ("training seconds", lambda entry, e: e["train_seconds"]),
    "flops": ("training FLOPs", lambda entry, e: e["images_seen"] * entry["train_flops_per_image"]),
}


def _log_y(ax) -> None:
    """A log y axis labelled with plain numbers (minor ticks too when it spans little)."""
    from matplotlib import ticker

    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:.4g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if hi / max(lo, 1e-12) < 20 else ticker.NullFormatter())


def _quality_figure(results: dict, axis: str, path: Path) -> Path:
    """FID and label accuracy against one measure of compute, a line per (preset, lr)."""
    import matplotlib.pyplot as plt

    x_label, x_of = _X_AXES[axis]
    styles = _style(results["presets"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = results["floor"]
    for ax, metric, title in ((axes[0], "fid", "FID (lower is better)"), (axes[1], "label_accuracy", "label accuracy (higher is better)")):
        for entry in results["presets"]:
            for run in entry["runs"]:
                pts = [(x_of(entry, e), e[metric]) for e in run["evals"] if e.get(metric) is not None]
                if pts:
                    ax.plot(*zip(*pts), **styles[(entry["preset"], run["lr"])])
        if metric == "fid":
            _log_y(ax)
            if "fid" in floor:  # a line would squash the curves into the top of the axis
                title = f"FID (lower is better; real data {floor['fid']:.3g})"
        elif metric in floor:
            ax.axhline(floor[metric], color="grey", linewidth=0.8, linestyle=":", label=f"real data ({floor[metric]:.3g})")
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(x_label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)  # (tight_layout costs seconds)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_figure(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    styles = _style(results["presets"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for entry in results["presets"]:
        for run in entry["runs"]:
            pts = [(p["images_seen"], p["loss"]) for p in run["loss"]]
            if pts:
                st = dict(styles[(entry["preset"], run["lr"])], marker=None)
                ax.plot(*zip(*pts), **st)
    ax.set_xlabel("training images seen")
    ax.set_ylabel("training loss (mean per log window)")
    _log_y(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.13, top=0.96)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sample_grid(out_dir: Path, entry: dict, results: dict) -> Path | None:
    """The best run's last evaluation grid, copied to OUT/samples_<preset>.png (drawn again from
    the checkpoint if it is missing)."""
    best = next((r for r in entry["runs"] if r["lr"] == entry["best_lr"]), None)
    if best is None or best["final"] is None:
        return None
    run_dir = out_dir / best["run_dir"]
    dest = out_dir / f"samples_{entry['preset']}.png"
    src = run_dir / best["final"].get("grid", "")
    if best["final"].get("grid") and src.is_file():
        shutil.copyfile(src, dest)
        return dest
    from ..sample import Pipeline

    s = results["settings"]
    pipe = Pipeline.from_pretrained(run_dir, precision=s["precision"])
    labels = pipe.cycled_labels(min(s["eval_n"], GRID_PER_CLASS * pipe.num_classes))
    images = pipe(labels, sampler=s["sampler"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"])
    return pipe.save_grid(images, labels, dest)


def _fmt(value, spec: str = ".3f", missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "params (M)", "GFLOPs / image (fwd)", "train images/s", "best lr", "FID", "label acc.", "precision", "recall", "images seen", "train s"]
    rows = []
    for e in results["presets"]:
        b = e["best"] or {}
        rows.append([
            e["preset"], f"{e['params'] / 1e6:.2f}", f"{e['gflops_per_image']:.3f}", _fmt(e["images_per_s"], ".0f"),
            _fmt(e["best_lr"], "g"), _fmt(b.get("fid"), ".2f"), _fmt(b.get("label_accuracy")), _fmt(b.get("precision")),
            _fmt(b.get("recall")), _fmt(b.get("images_seen"), ",d"), _fmt(b.get("train_seconds"), ".1f"),
        ])  # fmt: skip
    f = results["floor"]
    rows.append(["real data (floor)", "", "", "", "", _fmt(f.get("fid"), ".2f"), _fmt(f.get("label_accuracy")),
                 _fmt(f.get("precision")), _fmt(f.get("recall")), "", ""])  # fmt: skip
    return head, rows


def _run_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "lr", "eval points", "FID", "label acc.", "precision", "recall", "images seen", "train s", "train images/s"]
    rows = []
    for e in results["presets"]:
        for r in e["runs"]:
            f = r["final"] or {}
            mark = " *" if r["lr"] == e["best_lr"] else ""
            rows.append([
                e["preset"], f"{r['lr']:g}{mark}", f"{len(r['evals'])}/{r['eval_points']}" + (" (diverged)" if r.get("diverged") else ""), _fmt(f.get("fid"), ".2f"),
                _fmt(f.get("label_accuracy")), _fmt(f.get("precision")), _fmt(f.get("recall")),
                _fmt(f.get("images_seen"), ",d"), _fmt(f.get("train_seconds"), ".1f"), _fmt(r["images_per_s"], ".0f"),
            ])  # fmt: skip
    return head, rows


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head, rows) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _settings_line(results: dict) -> str:
    s = results["settings"]
    m = results["machine"]
    used = sorted({e["sampler"] for p in results["presets"] for r in p["runs"] for e in r["evals"] if "sampler" in e})
    sampler = "/".join(used) or s["sampler"] or "default sampler"
    threads = f"{m['torch_threads']} torch thread" + ("s" if m["torch_threads"] != 1 else "")
    return (
        f"Budget {s['budget']['text']} per run; learning rates {', '.join(f'{lr:g}' for lr in s['lrs'])}; "
        f"scored at {', '.join(f'{f:.0%}' for f in s['fractions'])} of the budget on {s['eval_n']} samples "
        f"({sampler}, {s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}, EMA weights) against the "
        f"{s['dataset']} test split; trained on {m['device']} with {threads}, precision {s['precision']}."
    )


NOTES = (
    "Training seconds count optimiser steps only (no sample grids, checkpoints or evaluations). "
    "Training FLOPs are 3 x the forward FLOPs per image x images seen. "
    "FID is measured in the feature space of the package's small evaluator CNN (not Inception) and is biased upwards "
    "for small sample counts: compare only numbers with the same n, and against the real-data floor (training images scored the same way). "
    "The best learning rate of a preset has the lowest final FID (ties: the highest label accuracy)."
)


def write_report(out_dir: Path, results: dict) -> dict[str, Path]:
    """Write the figures, report.md, report.html and results.json into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")

    out_dir = Path(out_dir)
    figures = {f"quality_vs_{axis}": _quality_figure(results, axis, out_dir / f"quality_vs_{axis}.png") for axis in _X_AXES}
    figures["loss"] = _loss_figure(results, out_dir / "loss.png")
    grids = {}
    for entry in results["presets"]:
        g = _sample_grid(out_dir, entry, results)
        entry["samples"] = g.name if g else None
        if g:
            grids[entry["preset"]] = g
    results["figures"] = {k: p.name for k, p in figures.items()}
    write_json(out_dir / "results.json", results)

    title = "simple-dit comparison: " + " vs ".join(e["preset"] for e in results["presets"])
    captions = {
        "quality_vs_images": "Quality against training images seen",
        "quality_vs_seconds": "Quality against training time",
        "quality_vs_flops": "Quality against training compute",
        "loss": "Training loss",
    }

    def grid_caption(entry) -> str:
        b = entry["best"] or {}
        return f"{entry['preset']} at lr {entry['best_lr']:g}: FID {_fmt(b.get('fid'), '.2f')}, label accuracy {_fmt(b.get('label_accuracy'))}"

    with_grid = [e for e in results["presets"] if e["preset"] in grids]
    md = [f"# {title}", "", _settings_line(results), "", "## Summary", "", _md_table(*_summary_rows(results)), ""]
    md += ["## Samples (each preset at its best learning rate)", ""]
    if with_grid:
        md += ["| " + " | ".join(grid_caption(e) for e in with_grid) + " |", "|" + "---|" * len(with_grid)]
        md += ["| " + " | ".join(f"![{e['preset']}]({grids[e['preset']].name})" for e in with_grid) + " |", ""]
    for key, path in figures.items():
        md += [f"## {captions[key]}", "", f"![{captions[key]}]({path.name})", ""]
    md += ["## All runs", "", _md_table(*_run_rows(results)), "", "`*` marks the best learning rate of each preset.", ""]
    md += ["## Notes", "", NOTES, ""]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(md)))

    css = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        ".grids{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}figure{margin:0}"
        "figcaption{font-size:14px;margin-top:4px}img{max-width:100%;image-rendering:pixelated}.note{color:#555;font-size:14px}"
    )
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{css}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(_settings_line(results))}</p>",
        '<h2 id="summary">Summary</h2>', _html_table(*_summary_rows(results)),
        '<h2 id="samples">Samples (each preset at its best learning rate)</h2>', '<div class="grids">',
    ]  # fmt: skip
    for e in with_grid:
        parts.append(
            f'<figure><img src="{_data_uri(grids[e["preset"]])}" alt="samples of {html.escape(e["preset"])}">'
            f"<figcaption>{html.escape(grid_caption(e))}</figcaption></figure>"
        )
    parts.append("</div>")
    for key, path in figures.items():
        parts += [f'<h2 id="{key}">{html.escape(captions[key])}</h2>', f'<img src="{_data_uri(path)}" alt="{html.escape(captions[key])}">']
    parts += ['<h2 id="runs">All runs</h2>', _html_table(*_run_rows(results)), '<p class="note">* marks the best learning rate of each preset.</p>']
    parts += ['<h2 id="notes">Notes</h2>', f'<p class="note">{html.escape(NOTES)}</p>', "</body></html>", ""]
    atomic_write(out_dir / "report.html", lambda tmp: Path(tmp).write_text("\n".join(parts)))
    return {"report.md": out_dir / "report.md", "report.html": out_dir / "report.html", "results.json": out_dir / "results.json", **figures, **grids}
