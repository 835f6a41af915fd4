"""The report of a comparison: the quality, loss and guidance-frontier figures, each preset's
sample grid, the verdict, and ``report.md``, the self-contained ``report.html`` and
``results.json`` written from the collected results, with the number formatting they share."""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from pathlib import Path

from ..errors import UserError
from ..evaluate import BOOTSTRAP_LEVEL, GUIDANCE_RULE, SIGNIFICANCE
from ..extras import require
from ..io import atomic_copy, atomic_write, ensure_writable_dir, write_json

GRID_PER_CLASS = 8


def _colours():
    import matplotlib

    return matplotlib.colormaps["tab10"].colors


def _style(presets: list[dict]):
    """A line style per (preset label, lr): a colour per preset, a dash per lr, the best bold."""
    colours = _colours()
    dashes = ["-", "--", ":", "-."]
    styles = {}
    for i, entry in enumerate(presets):
        for j, agg in enumerate(entry["lrs"]):
            best = agg["lr"] == entry["best_lr"]
            styles[(entry["label"], agg["lr"])] = dict(
                color=colours[i % len(colours)], linestyle=dashes[j % len(dashes)], linewidth=2.2 if best else 1.2,
                alpha=1.0 if best else 0.75, marker="o", markersize=4 if best else 3,
                label=f"{entry['label']} lr={agg['lr']:g}" + (f" g={agg['guidance']:g}" if agg["guidance"] is not None else "")
                + (" (best)" if best else ""),
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
    """FID and label accuracy against one measure of compute, a line per (preset, lr): the seed
    mean at the lr's guidance, shaded over the seeds' spread."""
    import matplotlib.pyplot as plt

    x_label, x_of = _X_AXES[axis]
    styles = _style(results["presets"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = results["floor"]
    for ax, metric, title in ((axes[0], "fid", "FID (lower is better)"), (axes[1], "label_accuracy", "label accuracy (higher is better)")):
        for entry in results["presets"]:
            for agg in entry["lrs"]:
                pts = [(x_of(entry, c), c[metric]) for c in agg["curve"] if math.isfinite(c[metric]["mean"])]
                if not pts:
                    continue
                style = styles[(entry["label"], agg["lr"])]
                ax.plot([x for x, _ in pts], [m["mean"] for _, m in pts], **style)
                if len(agg["seeds"]) > 1:
                    ax.fill_between([x for x, _ in pts], [m["lo"] for _, m in pts], [m["hi"] for _, m in pts],
                                    color=style["color"], alpha=0.12, linewidth=0)  # fmt: skip
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


def _best_lr(entry: dict) -> dict | None:
    return next((a for a in entry["lrs"] if a["lr"] == entry["best_lr"]), None)


def _verdict_figure(results: dict, path: Path) -> Path:
    """The answer in one figure: FID and label accuracy against training images, seconds and
    FLOPs, each preset at its best learning rate and guidance, the seed mean at every evaluation
    point with the seeds' spread as error bars."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    colours = _colours()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey="row")
    floor, n = results["floor"], results["settings"]["eval_n"]
    for col, (axis, (x_label, x_of)) in enumerate(_X_AXES.items()):
        for row, metric in enumerate(("fid", "label_accuracy")):
            ax = axes[row][col]
            for i, entry in enumerate(results["presets"]):
                agg = _best_lr(entry)
                pts = [(x_of(entry, c), c[metric]) for c in (agg or {}).get("curve", []) if math.isfinite(c[metric]["mean"])]
                if not pts:
                    continue
                xs, stats = [x for x, _ in pts], [m for _, m in pts]
                means = [m["mean"] for m in stats]
                # Never negative: a record written before intervals were made to contain their estimate may miss it by rounding.
                errors = ([[max(m["mean"] - m["lo"], 0.0) for m in stats], [max(m["hi"] - m["mean"], 0.0) for m in stats]]
                          if stats[0]["lo"] is not None else None)  # fmt: skip
                ax.errorbar(xs, means, yerr=errors, color=colours[i % len(colours)], marker="o", markersize=5, capsize=3, linewidth=1.6,
                            label=f"{entry['label']}, lr {agg['lr']:g}, guidance {agg['guidance']:g}")  # fmt: skip
            if metric in floor:
                ax.axhline(floor[metric], color="grey", linewidth=0.8, linestyle=":", label=f"real data ({floor[metric]:.3g})")
            lo, hi = ax.get_xlim()
            if lo > 0 and hi / lo > 10:  # presets far apart in cost (a DiT and a UNet in FLOPs)
                ax.set_xscale("log")
            else:  # from zero: the budget spent, not a zoom on the differences between runs
                ax.set_xlim(0, hi * 1.05)
            ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
            if ax.get_xscale() == "log" and hi / lo < 100:  # under two decades one major tick may show: label 2x and 5x too
                ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2, 5)))
                ax.xaxis.set_minor_formatter(ticker.EngFormatter(sep=""))
            else:
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel(x_label)
        axes[0][0].set_ylabel("FID (lower is better)")
        axes[1][0].set_ylabel("label accuracy (higher is better)")
    _log_y(axes[0][0])
    axes[1][0].set_ylim(-0.02, 1.02)
    axes[0][2].legend(fontsize=7, loc="best")
    axes[1][2].legend(fontsize=7, loc="best")
    fig.suptitle(f"Each preset at its best learning rate and guidance; mean and spread over seeds ({n:,} samples per point)", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.08, top=0.93, wspace=0.08, hspace=0.12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_figure(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    styles = _style(results["presets"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for entry in results["presets"]:
        labelled = set()
        for run in entry["runs"]:  # every seed, one legend entry per lr
            pts = [(p["images_seen"], p["loss"]) for p in run["loss"]]
            if pts:
                st = dict(styles[(entry["label"], run["lr"])], marker=None)
                if run["lr"] in labelled:
                    st["label"] = None
                labelled.add(run["lr"])
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


def _frontier(ax, series, floor: dict) -> None:
    """FID (log) against label accuracy, a line through the guidance scales of each series
    ``(label, rows, picked guidance)``; rows hold ``guidance``, ``fid``, ``label_accuracy`` and
    optional intervals ``fid_ci``/``label_accuracy_ci`` drawn as error bars; the pick circled."""
    colours = _colours()
    for i, (label, rows, picked) in enumerate(series):
        rows = sorted((r for r in rows if _finite(r.get("fid")) and _finite(r.get("label_accuracy"))), key=lambda r: r["guidance"])
        if not rows:
            continue
        colour = colours[i % len(colours)]
        x, y = [r["label_accuracy"] for r in rows], [r["fid"] for r in rows]

        def err(key, centre):
            spans = [r.get(key) or [c, c] for r, c in zip(rows, centre)]
            return [[max(c - lo, 0) for c, (lo, _) in zip(centre, spans)], [max(hi - c, 0) for c, (_, hi) in zip(centre, spans)]]

        ax.errorbar(x, y, xerr=err("label_accuracy_ci", x), yerr=err("fid_ci", y), color=colour, marker="o", markersize=4,
                    capsize=2, linewidth=1.2, label=label)  # fmt: skip
        for r in rows:
            ax.annotate(f"{r['guidance']:g}", (r["label_accuracy"], r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
            if r["guidance"] == picked:
                ax.plot(r["label_accuracy"], r["fid"], marker="o", markersize=12, markerfacecolor="none", markeredgecolor=colour, markeredgewidth=1.8)
    if _finite(floor.get("fid")) and _finite(floor.get("label_accuracy")):
        ax.plot(floor["label_accuracy"], floor["fid"], marker="*", markersize=11, color="grey", linestyle="none", label="real data")
    ax.set_xlabel("label accuracy (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    _log_y(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def check_plot_path(path: Path) -> None:
    """Fail now, not after sampling, on a plot path that cannot be written."""
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"--plot {path}: expected a file name ending in .png")
    if Path(path).is_dir():
        raise UserError(f"--plot {path} is a directory; name the PNG file to write")
    ensure_writable_dir(Path(path).parent)
    require("matplotlib", "report", "--plot")


def write_frontier_figure(series, floor: dict, path: Path, title: str | None = None) -> Path:
    """The FID against label-accuracy frontier over guidance scales (see ``_frontier``) as a PNG."""
    matplotlib = require("matplotlib", "report", "the guidance frontier plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    _frontier(ax, series, floor)
    ax.set_title(title or "FID against label accuracy over guidance scales", fontsize=10)
    fig.text(0.01, 0.01, f"numbers: guidance scales; circled: the pick, {GUIDANCE_RULE}", fontsize=6.5, color="#444")
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.93)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def _frontier_series(results: dict) -> list:
    """Each preset at its best learning rate: the seed means at each guidance scale, with the
    seeds' spread (or, with one seed, the bootstrap interval) as error bars."""
    series = []
    for entry in results["presets"]:
        agg = _best_lr(entry)
        if agg is None:
            continue
        rows = [{"guidance": row["guidance"], **{m: row[m]["mean"] for m in ("fid", "label_accuracy")},
                 **{f"{m}_ci": [row[m]["lo"], row[m]["hi"]] for m in ("fid", "label_accuracy") if row[m]["lo"] is not None}}
                for row in agg["guidances"]]  # fmt: skip
        series.append((f"{entry['label']} lr={agg['lr']:g}", rows, agg["guidance"]))
    return series


def _sample_grid(out_dir: Path, entry: dict, results: dict) -> Path | None:
    """The last evaluation grid of the best learning rate's first seed, copied to
    OUT/samples_<preset>[_<objective>].png (drawn again from the checkpoint if it is missing)."""
    best = next((r for r in entry["runs"] if r["lr"] == entry["best_lr"]), None)
    if best is None or best["final"] is None:
        return None
    run_dir = out_dir / best["run_dir"]
    dest = out_dir / f"samples_{_slug(entry)}.png"
    src = run_dir / best["final"].get("grid", "")
    if best["final"].get("grid") and src.is_file():
        atomic_copy(src, dest)
        return dest
    from ..diffusion import GUIDE_EVERY_STEP
    from ..sample import Pipeline

    s = results["settings"]
    pipe = Pipeline.from_pretrained(run_dir, precision=s["precision"])
    labels = pipe.cycled_labels(min(s["eval_n"], GRID_PER_CLASS * pipe.num_classes))
    images = pipe(labels, sampler=s["sampler"], steps=s["steps"], guidance=entry["best_guidance"],
                  guidance_interval=GUIDE_EVERY_STEP, seed=best["seed"])
    return pipe.save_grid(images, labels, dest)


def _slug(entry: dict) -> str:
    """The preset's name, with its objective where the comparison overrides objectives."""
    return entry["preset"] + (f"_{entry['objective']}" if entry.get("objective_override") else "")


def _fmt(value, spec: str = ".3f", missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fmt_stat(stat: dict | None, spec: str = ".3f") -> str:
    """A seed mean and its spread: ``m ± std`` (3+ seeds), ``m (min–max)`` (2 seeds),
    ``m [lo, hi]`` (1 seed: the bootstrap interval), ``m`` (no spread)."""
    if not stat or not _finite(stat.get("mean")):
        return "–"
    mean = format(stat["mean"], spec)
    if stat["kind"] == "std":
        return f"{mean} ± {stat['spread']:{spec}}"
    if stat["kind"] == "min-max":
        return f"{mean} ({stat['lo']:{spec}}–{stat['hi']:{spec}})"
    if stat["kind"] == "ci":
        return f"{mean} [{stat['lo']:{spec}}, {stat['hi']:{spec}}]"
    return mean


_SPECS = {"fid": ".2f", "label_accuracy": ".3f", "precision": ".3f", "recall": ".3f"}


def _fmt_ci(scores: dict, metric: str) -> str:
    """One evaluation's ``metric`` with its bootstrap interval, if it has one."""
    ci = scores.get(f"{metric}_ci")
    return fmt_stat({"mean": scores.get(metric), "kind": "ci" if ci else None, "lo": ci and ci[0], "hi": ci and ci[1]}, _SPECS[metric])
_METRIC_NAMES = {"fid": "FID", "label_accuracy": "label accuracy"}


def _spread_note(stats: list[dict | None]) -> str:
    """What the cells of a table of ``stats`` (one per row) show: each seed count's own notation,
    since a grid in progress has rows of 3 seeds next to rows of 1."""
    counts = sorted({len(st["fid"]["values"]) for st in stats if st}, reverse=True)
    meaning = {1: f"one seed [its {BOOTSTRAP_LEVEL:.0%} bootstrap interval over the evaluation samples]", 2: "mean (min–max) over 2 seeds"}
    parts = [meaning.get(n, f"mean ± standard deviation over {n} seeds") for n in counts]
    return f"Cells: {'; '.join(parts)}." if parts else ""


def verdict_lines(results: dict, confirmed: bool = False) -> list[str]:
    """The verdict in words: per metric, the leading preset and, against each other one, ahead,
    a tie or not tested (see ``runner.verdict``); ``confirmed``: on the confirmation's fresh
    samples."""
    return _verdict_text(results.get("confirmed_verdict" if confirmed else "verdict", []), results, confirmed)


def effect_lines(results: dict, confirmed: bool = False) -> list[str]:
    """The verdicts of the backbones trained with one objective, and of one backbone's objectives
    (``runner.effects``), in the words of ``verdict_lines``."""
    lines = []
    for effect in results.get("confirmed_effects" if confirmed else "effects", []):
        where = f"backbones with {effect['fixed']}" if effect["factor"] == "backbone" else f"objectives of {effect['fixed']}"
        lines += [f"{where}: {line}" for line in _verdict_text(effect["verdict"], results, confirmed)]
    return lines


def _verdict_text(verdicts: list[dict], results: dict, confirmed: bool) -> list[str]:
    stats = {e["label"]: e["confirmed_stats" if confirmed else "best_stats"] for e in results["presets"]}
    lines = []
    for v in verdicts:
        m, spec = v["metric"], _SPECS[v["metric"]]
        better = "lower" if v["lower_is_better"] else "higher"
        parts = [f"{_OUTCOME[o.get('tie')]} {o['label']} {fmt_stat(stats[o['label']][m], spec)} ({_test_text(o, spec)})" for o in v["others"]]
        lines.append(f"{_METRIC_NAMES[m]} ({better} is better): {v['leader']} {fmt_stat(stats[v['leader']][m], spec)}, " + "; ".join(parts) + ".")
    return lines


_OUTCOME = {True: "tie with", False: "ahead of", None: "not tested against"}


def _test_text(other: dict, spec: str) -> str:
    """The difference and its test, e.g. "difference 0.61, p = 0.003, Welch's t-test over 3 and 3 seeds"."""
    said = f"difference {other['difference']:{spec}}"
    a, b = other.get("seeds") or ("?", "?")
    if other.get("test") == "welch":
        return f"{said}, {_fmt_p(other['p'])}, Welch's t-test over {a} and {b} seeds"
    if other.get("test") == "bootstrap":
        return f"{said}, {_fmt_p(other['p'])} on the evaluation samples only: one seed each, so the spread between training seeds is unknown"
    return f"{said}; {a} seed{'s' if a != 1 else ''} against {b}: no test"


def _fmt_p(p: float) -> str:
    return f"p {_p_value(p)}" if p < 0.001 else f"p = {_p_value(p)}"


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _pairwise_rows(pairs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every pair's p (FID / label accuracy) as the upper triangle of a preset-by-preset table."""
    labels = list(dict.fromkeys([p["a"] for p in pairs] + [p["b"] for p in pairs]))
    cell = {(p["a"], p["b"]): " / ".join(_fmt_pair_p(p[m]["p"]) for m in ("fid", "label_accuracy")) for p in pairs}
    return ["", *labels[1:]], [[a, *(cell.get((a, b), "") for b in labels[1:])] for a in labels[:-1]]


def _fmt_pair_p(p: float | None) -> str:
    if p is None:
        return "–"
    return _p_value(p) + ("*" if p < SIGNIFICANCE else "")


PAIRWISE_NOTE = (f"Every pair: p of the verdict's test for FID / label accuracy (* below {SIGNIFICANCE:g}: the two differ; "
                 "– not tested). Each cell is one test; with several, a few small p are expected by chance.")


def _summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "params (M)", "GFLOPs / image (fwd)", "train images/s", "best lr", "guidance", "FID", "label acc.",
            "precision", "recall", "images seen", "train s", "seeds"]  # fmt: skip
    rows = []
    for e in results["presets"]:
        b, st = e["best"] or {}, e["best_stats"]
        agg = _best_lr(e) or {"seeds": []}
        rows.append([
            e["label"], f"{e['params'] / 1e6:.2f}", f"{e['gflops_per_image']:.3f}", _fmt(e["images_per_s"], ".0f"),
            _fmt(e["best_lr"], "g"), _fmt(e["best_guidance"], "g"), *(fmt_stat(st[m], _SPECS[m]) for m in _SPECS),
            _fmt(b.get("images_seen"), ",.0f"), _fmt(b.get("train_seconds"), ".1f"), str(len(agg["seeds"])),
        ])  # fmt: skip
    f = results["floor"]
    rows.append(["real data (floor)", "", "", "", "", "", *(_fmt_ci(f, m) for m in _SPECS), "", "", ""])
    return head, rows


def _guidance_edge_note(results: dict) -> str | None:
    """A warning where a preset's picked guidance is the smallest or largest scale swept: a scale
    beyond the range may score better still."""
    swept = results["settings"]["guidances"]
    if len(swept) < 2:
        return None
    at_edge = [e["label"] for e in results["presets"] if e["best_guidance"] in (min(swept), max(swept))]
    if not at_edge:
        return None
    return (f"The guidance picked for {', '.join(at_edge)} is at the edge of the swept scales ({min(swept):g}–{max(swept):g}): "
            "a scale beyond the range may score better.")


def _lr_edge_note(results: dict) -> str | None:
    """A warning where a preset's best learning rate is the smallest or largest it was trained at:
    a rate beyond them may do better, and "which rate" is what a comparison is asked."""
    at_edge = []
    for e in results["presets"]:
        swept = sorted(a["lr"] for a in e["lrs"])
        if len(swept) > 1 and e["best_lr"] in (swept[0], swept[-1]):
            at_edge.append(f"{e['label']} {e['best_lr']:g} of {swept[0]:g}–{swept[-1]:g}")
    if not at_edge:
        return None
    return f"Best learning rates at the edge of those swept: {', '.join(at_edge)}; a rate beyond the range may do better."


def _confirmed_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "best lr", "guidance", "FID", "label acc.", "precision", "recall", "seeds"]
    rows = []
    for e in results["presets"]:
        st = e.get("confirmed_stats")
        if st:
            rows.append([e["label"], _fmt(e["best_lr"], "g"), _fmt(e["best_guidance"], "g"), *(fmt_stat(st[m], _SPECS[m]) for m in _SPECS),
                         str(len(st["fid"]["values"]))])  # fmt: skip
    if f := results.get("confirmed_floor"):  # scored at the confirmation's own sample count
        rows.append(["real data (floor)", "", "", *(_fmt_ci(f, m) for m in _SPECS), ""])
    return head, rows


def _lr_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "lr", "guidance", "FID", "label acc.", "precision", "recall", "seeds"]
    rows = []
    for e in results["presets"]:
        for a in e["lrs"]:
            mark = " *" if a["lr"] == e["best_lr"] else ""
            seeds = f"{len(a['seeds'])}" + (" (diverged)" if a["diverged"] else "" if a["complete"] else " (incomplete)")
            rows.append([e["label"], f"{a['lr']:g}{mark}", _fmt(a["guidance"], "g"), *(fmt_stat(a["stats"][m], _SPECS[m]) for m in _SPECS), seeds])
    return head, rows


def _guidance_table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "lr", "guidance", "FID", "label acc.", "precision", "recall"]
    rows = []
    for e in results["presets"]:
        agg = _best_lr(e)
        for row in agg["guidances"] if agg else []:
            mark = " *" if row["guidance"] == agg["guidance"] else ""
            rows.append([e["label"], f"{agg['lr']:g}", f"{row['guidance']:g}{mark}", *(fmt_stat(row[m], _SPECS[m]) for m in _SPECS)])
    return head, rows


def _run_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "lr", "seed", "eval points", "guidance", "FID", "label acc.", "precision", "recall", "images seen", "train s",
            "train images/s"]  # fmt: skip
    rows = []
    for e in results["presets"]:
        for r in e["runs"]:
            f = r["final"] or {}
            mark = " *" if r["lr"] == e["best_lr"] else ""

            rows.append([
                e["label"], f"{r['lr']:g}{mark}", str(r["seed"]),
                f"{len(r['evals'])}/{r['eval_points']}" + (" (diverged)" if r.get("diverged") else ""), _fmt(f.get("guidance"), "g"),
                *(_fmt_ci(f, m) for m in _SPECS), _fmt(f.get("images_seen"), ",d"), _fmt(f.get("train_seconds"), ".1f"),
                _fmt(r["images_per_s"], ".0f"),
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
    objectives = f"objectives {', '.join(s['objectives'])} (overriding the presets' own)" if s.get("objectives") else "each preset's own objective"
    return (
        f"Budget {s['budget']['text']} per run; learning rates {', '.join(f'{lr:g}' for lr in s['lrs'])}; "
        f"{objectives}; seeds {', '.join(map(str, s['seeds']))} (each its own run{_combinations(s)}); "
        f"scored at {', '.join(f'{f:.0%}' for f in s['fractions'])} of the budget on {s['eval_n']} samples "
        f"({sampler}, {s['steps']} steps, guidance {', '.join(f'{g:g}' for g in s['guidances'])} at every step, EMA weights) against the "
        f"{s['dataset']} test split; trained on {_machines(results) or m['device']} with {threads}, {_how_trained(results)}."
    )


def _combinations(settings: dict) -> str:
    """Where the runs asked for are not every combination of the lists (e.g. a second objective at
    one learning rate only), how many they are."""
    asked = settings.get("asked")
    grid = len(settings["presets"]) * len(settings.get("objectives") or [None]) * len(settings["lrs"]) * len(settings["seeds"])
    return "" if asked is None or len(asked) >= grid else f"; not every combination: {len(asked)} runs asked for"


def _unfinished_note(results: dict) -> str | None:
    """The runs asked for that no mean counts: not started, or stopped (or still training) before
    their last evaluation."""
    unfinished = results.get("unfinished") or []
    if not unfinished:
        return None
    groups: dict[tuple, list[int]] = {}
    for run in unfinished:
        groups.setdefault((run["preset"], run["objective"], run["lr"], run["started"]), []).append(run["seed"])
    parts = [f"{preset} ({objective}) lr {lr:g} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} ({'unfinished' if started else 'not started'})"
             for (preset, objective, lr, started), seeds in groups.items()]  # fmt: skip
    asked = results["settings"].get("asked")
    count = f"{len(unfinished)} of the {len(asked)} runs asked for" if asked else f"{len(unfinished)} run{'s' if len(unfinished) != 1 else ''} asked for"
    return f"Not yet counted, not finished: {count} ({'; '.join(parts)}); the same compare command finishes them."


def _how_trained(results: dict) -> str:
    """The precision the runs trained in (``auto`` as each machine resolved it) and whether they
    were compiled, with the runs of each where they differ: under a time budget a run in bf16 or
    compiled sees more images than one in fp32 or eager. Records from before they were recorded
    count as not known."""
    s = results["settings"]
    finished = [r["final"] for e in results["presets"] for r in e["runs"] if r["final"]]

    def counts(key: str, name) -> str:
        counted = Counter(name(f[key]) if key in f else "not recorded" for f in finished)
        return "; ".join(f"{value} ({n} run{'s' if n != 1 else ''})" for value, n in counted.most_common())

    precisions = Counter(f.get("train_precision") for f in finished)
    precision = f"precision {s['precision']}"
    if len(precisions) > 1:
        precision += f": {counts('train_precision', str)}"
    elif s["precision"] == "auto" and None not in precisions and precisions:
        precision += f" ({next(iter(precisions))})"
    compiled = Counter(f.get("compiled") for f in finished)
    if len(compiled) > 1:
        return f"{precision}; {counts('compiled', lambda c: 'compiled' if c else 'eager')}"
    only = next(iter(compiled), None)
    return precision + (", compiled" if (s.get("compile") if only is None else only) else "")


def _machines(results: dict) -> str:
    """The machines the runs trained on, with how many runs each (records from before they were
    recorded: none), e.g. for a comparison continued from another machine's records."""
    finished = [r["final"] for e in results["presets"] for r in e["runs"] if r["final"]]
    counted = Counter(r["machine"] for r in finished if r.get("machine"))
    if len(counted) <= 1:
        return next(iter(counted), "")
    unrecorded = sum(1 for r in finished if not r.get("machine"))  # so that the counts add up to the runs
    return "; ".join([f"{name} ({n} run{'s' if n != 1 else ''})" for name, n in counted.most_common()]
                     + ([f"not recorded ({unrecorded} run{'s' if unrecorded != 1 else ''})"] if unrecorded else []))  # fmt: skip


NOTES = (
    "Training seconds count optimiser steps only (no sample grids, checkpoints or evaluations). "
    "Training FLOPs are 3 x the forward FLOPs per image x images seen. "
    "FID is measured in the feature space of the package's small evaluator CNN (not Inception) and is biased upwards "
    "for small sample counts: compare only numbers with the same n, and against the real-data floor at that n (training images scored "
    "the same way; the evaluator learned from them, so the floor's label accuracy is somewhat above its accuracy on unseen digits). "
    f"Guidance is chosen the way the learning rate is: of each learning rate's guidance scales, the one with {GUIDANCE_RULE}, "
    "on the seed means of the final scores. The best learning rate of a preset has the lowest seed-mean final FID at its "
    "guidance (ties: the highest label accuracy), among the learning rates scored on every seed the preset (and objective) has runs of, where any is; "
    "a learning rate with a diverged seed is not picked. "
    "Spread: the standard deviation over seeds (3 or more), the min-max range (2), half the "
    f"{BOOTSTRAP_LEVEL:.0%} bootstrap interval over the evaluation samples (1). "
    f"In the verdict each preset is tested against the leader, and is behind it only where the test rejects equal means at p < {SIGNIFICANCE:g} "
    "(else a tie): Welch's t-test over the seeds where both have 2 or more; with one seed each, a z-test on the two bootstrap "
    "intervals, which measures evaluation noise only, not the spread between training seeds; one seed against several, or "
    "values with no spread at all on both sides (e.g. every seed's label accuracy 1.000), is not tested. "
    "Each pair is one test at that level (no correction for testing several pairs)."
)

EFFECTS_INTRO = ("The backbone apart from the objective: each backbone against the others trained with the same "
                 "objective, and each backbone's objectives against each other (same tie rule).")

_CAPTIONS = {
    "verdict": "The answer in one figure: quality against training images, seconds and FLOPs",
    "quality_vs_images": "Quality against training images seen",
    "quality_vs_seconds": "Quality against training time",
    "quality_vs_flops": "Quality against training compute",
    "frontier": "FID against label accuracy over guidance scales (each preset at its best learning rate)",
    "loss": "Training loss",
}


def _sections(results: dict, figures: dict[str, Path], grids: dict[str, tuple[Path, str]]) -> list[tuple[str, str, list]]:
    """The report as (id, title, blocks); a block is ("p", text), ("note", text), ("list", lines),
    ("table", (head, rows)), ("img", path) or ("grids", [(path, caption)])."""
    verdict = verdict_lines(results)
    summary = [("list", verdict)] if verdict else []
    if unfinished := _unfinished_note(results):
        summary.append(("note", unfinished))
    if left_out := [e["label"] for e in results["presets"] if not _finite(e["best_stats"]["fid"]["mean"])]:
        summary.append(("note", f"Not in the verdict: {', '.join(left_out)} (no learning rate with a finished seed and none "
                                "diverged)."))
    if effects := effect_lines(results):
        summary += [("p", EFFECTS_INTRO), ("list", effects)]
    summary += [("table", _summary_rows(results)), ("note", _spread_note([e["best_stats"] for e in results["presets"]]) + f" Verdict: ahead where p < {SIGNIFICANCE:g}, else a tie, or not tested (see the notes).")]
    if len(pairs := results.get("pairwise", [])) > 1:
        summary += [("table", _pairwise_rows(pairs)), ("note", PAIRWISE_NOTE)]
    for edge in (_lr_edge_note(results), _guidance_edge_note(results)):
        if edge:
            summary.append(("note", edge))
    sections = [("summary", "Summary", summary)]
    n = results["settings"].get("final_n")
    if n and any(e.get("confirmed_stats") for e in results["presets"]):
        confirmed = verdict_lines(results, confirmed=True)
        blocks = [("p", f"Each preset at its best learning rate (picked above on {results['settings']['eval_n']:,} samples): every seed's "
                        f"run scored again, at the guidance picked above on the seed means, on {n:,} fresh samples (other "
                        "sampling seeds than the selection's).")]
        waiting = [e["label"] for e in results["presets"] if e["best"] and not e.get("confirmed_stats")]
        if confirmed:
            blocks.append(("list", confirmed))
        elif waiting:
            blocks.append(("note", f"The confirmed verdict waits for the confirmation of {', '.join(waiting)} (every seed at its preset's "
                                   "picked guidance; a run whose weights are gone cannot be confirmed at another scale than its own pick)."))
        if effects := effect_lines(results, confirmed=True):
            blocks += [("p", EFFECTS_INTRO), ("list", effects)]
        blocks += [("table", _confirmed_rows(results)), ("note", _spread_note([e.get("confirmed_stats") for e in results["presets"]]))]
        if len(pairs := results.get("confirmed_pairwise", [])) > 1:
            blocks += [("table", _pairwise_rows(pairs)), ("note", PAIRWISE_NOTE)]
        sections.append(("confirmed", f"Confirmed on {n:,} fresh samples", blocks))
    sections.append(("samples", "Samples (each preset at its best learning rate and guidance)", [("grids", list(grids.values()))]))
    for key, path in figures.items():
        blocks = [("img", path)]
        if key == "frontier":
            blocks = [("p", f"Guidance is picked by the rule: {GUIDANCE_RULE} (on the seed means of the final scores; the pick is marked *).")]
            blocks += [("img", path), ("table", _guidance_table_rows(results))]
        sections.append((key, _CAPTIONS[key], blocks))
    sections.append(("lrs", "All learning rates (seed means at each learning rate's guidance)",
                     [("table", _lr_rows(results)), ("note", "The best learning rate of each preset is marked *.")]))  # fmt: skip
    sections.append(("runs", "All runs (each seed's final scores at the guidance its own evaluation picked)",
                     [("table", _run_rows(results)), ("note", "The best learning rate of each preset is marked *.")]))  # fmt: skip
    sections.append(("notes", "Notes", [("note", NOTES)]))
    return sections


def _markdown(title: str, intro: str, sections) -> str:
    md = [f"# {title}", "", intro, ""]
    for _, heading, blocks in sections:
        md += [f"## {heading}", ""]
        for kind, content in blocks:
            if kind in ("p", "note"):
                md += [content, ""]
            elif kind == "list":
                md += [f"- {line}" for line in content] + [""]
            elif kind == "table":
                md += [_md_table(*content), ""]
            elif kind == "img":
                md += [f"![{heading}]({content.name})", ""]
            elif kind == "grids" and content:
                md += ["| " + " | ".join(caption for _, caption in content) + " |", "|" + "---|" * len(content)]
                md += ["| " + " | ".join(f"![{caption}]({path.name})" for path, caption in content) + " |", ""]
    return "\n".join(md)


def _html(title: str, intro: str, sections) -> str:
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        ".grids{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}figure{margin:0}"
        "figcaption{font-size:14px;margin-top:4px}img{max-width:100%;image-rendering:pixelated}.note{color:#555;font-size:14px}"
    )
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{css}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>",
    ]  # fmt: skip
    for key, heading, blocks in sections:
        parts.append(f'<h2 id="{key}">{html.escape(heading)}</h2>')
        for kind, content in blocks:
            if kind in ("p", "note"):
                parts.append(('<p class="note">' if kind == "note" else "<p>") + f"{html.escape(content)}</p>")
            elif kind == "list":
                parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in content) + "</ul>")
            elif kind == "table":
                parts.append(_html_table(*content))
            elif kind == "img":
                parts.append(f'<img src="{_data_uri(content)}" alt="{html.escape(heading)}">')
            elif kind == "grids":
                parts.append('<div class="grids">' + "".join(
                    f'<figure><img src="{_data_uri(path)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                    for path, caption in content) + "</div>")  # fmt: skip
    parts += ["</body></html>", ""]
    return "\n".join(parts)


def write_report(out_dir: Path, results: dict) -> dict[str, Path]:
    """Write the figures, report.md, report.html and results.json into ``out_dir``."""
    matplotlib = require("matplotlib", "report", "the comparison report")
    matplotlib.use("Agg")

    out_dir = Path(out_dir)
    figures = {"verdict": _verdict_figure(results, out_dir / "verdict.png")}
    figures |= {f"quality_vs_{axis}": _quality_figure(results, axis, out_dir / f"quality_vs_{axis}.png") for axis in _X_AXES}
    figures["frontier"] = write_frontier_figure(_frontier_series(results), results["floor"], out_dir / "guidance_frontier.png",
                                                title=_CAPTIONS["frontier"])  # fmt: skip
    figures["loss"] = _loss_figure(results, out_dir / "loss.png")
    grids = {}
    for entry in results["presets"]:
        g = _sample_grid(out_dir, entry, results)
        entry["samples"] = g.name if g else None
        if g:
            b = entry["best_stats"]
            caption = (f"{entry['label']} at lr {entry['best_lr']:g}, guidance {entry['best_guidance']:g}: "
                       f"FID {fmt_stat(b['fid'], '.2f')}, label accuracy {fmt_stat(b['label_accuracy'])}")  # fmt: skip
            grids[entry["label"]] = (g, caption)
    shown = {path for path, _ in grids.values()}
    for stale in out_dir.glob("samples_*.png"):  # e.g. samples_dit-tiny.png once the report adds objectives to the names
        if stale not in shown:
            stale.unlink()
    results["figures"] = {k: p.name for k, p in figures.items()}
    results["verdict_text"] = verdict_lines(results)
    results["confirmed_verdict_text"] = verdict_lines(results, confirmed=True)
    results["effects_text"] = effect_lines(results)
    results["confirmed_effects_text"] = effect_lines(results, confirmed=True)
    write_json(out_dir / "results.json", results)

    title = "simple-dit comparison: " + " vs ".join(e["label"] for e in results["presets"])
    sections = _sections(results, figures, grids)
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text(_markdown(title, _settings_line(results), sections)))
    atomic_write(out_dir / "report.html", lambda tmp: Path(tmp).write_text(_html(title, _settings_line(results), sections)))
    return {"report.md": out_dir / "report.md", "report.html": out_dir / "report.html", "results.json": out_dir / "results.json",
            **figures, **{label: path for label, (path, _) in grids.items()}}  # fmt: skip
