"""The run report: what happened over the iterations, as a Markdown table and plots.

Consumes a run directory: `metrics.jsonl` (one summary per finished iteration, see minitpo.summary),
`iter-N/train_log.jsonl` (one row per optimizer update) and, when an evaluation has been run,
`eval/*.json` (win rates: {"against": "seed", "model": "iter-N", "win_rate", "ci_low", "ci_high"}).
Produces `report.md` and PNG plots in `report/`, both rewritten on every call.

What to look for (Wu et al. 2024): judge scores of the chosen responses rise over iterations, thoughts
tend to get shorter while responses do not run away in length (that is what rho is for), the parse
rate should not collapse, and the DPO reward accuracy of each iteration should end well above 0.5.

A missing key or a None value (an iteration with no pairs has no loss) is a gap in a plot, never an
error: older runs and partial iterations still get a report. The figures are drawn on
`matplotlib.figure.Figure` objects, which render PNGs with the Agg backend and never touch pyplot's
global state or open a window.
"""

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from minitpo import io, rundir
from minitpo.summary import read_metrics
from minitpo.errors import UserError

# The per-iteration figures: (file, heading in report.md, figure title, panels). Each panel is
# (title, y label, lines, y limits) and each line (key in metrics.jsonl, legend label, line style).
ITERATION_FIGURES = [
    ("scores.png", "Judge scores", "Mean judge score of responses", [
        ("", "score", [("judge_score", "all parsed responses", "-"), ("chosen_score", "chosen", "-"),
                       ("rejected_score", "rejected", "-")], None)]),
    ("lengths.png", "Lengths", "Mean thought and response length (parsed candidates)", [
        ("", "characters", [("thought_chars", "thought", "-"), ("response_chars", "response", "-"),
                            ("chosen_response_chars", "chosen response", "--"),
                            ("rejected_response_chars", "rejected response", "--")], None)]),
    ("format.png", "Format and length control", "Output format and length control", [
        ("Candidates", "fraction of candidates",
         [("parse_rate", "parsed", "-"), ("marker_rate", "marker written by the model", "-"),
          ("thought_rate", "thought, marker and response by the model", "-"),
          ("heldout_marker_rate", "held-out (eval): marker by the model", "-."),
          ("forced_rate", "marker forced", ":"), ("truncated_rate", "hit max_new_tokens", "--")], (0, 1.05)),
        ("Length control strength", "rho", [("rho", "rho", "-")], (0, 0.52))]),
    ("constraints.png", "Verifiable constraints", "Constraints met by parsed responses (verifiable instructions)", [
        ("", "fraction of constraints met", [("constraint_pass_rate", "met", "-")], (0, 1.05))]),
    ("dpo.png", "DPO training, per iteration", "DPO training (mean over the last epoch's updates)", [
        ("Loss", "DPO loss", [("train_loss", "loss", "-")], None),
        ("Reward accuracy", "chosen reward > rejected", [("reward_accuracy", "accuracy", "-")], (0, 1.05)),
        ("Reward margin", "chosen - rejected reward", [("reward_margin", "margin", "-")], None)]),
]

# The table in report.md: (column header, key, number format).
COLUMNS = [("iter", "iteration", "d"), ("parse rate", "parse_rate", ".2f"), ("judge score", "judge_score", ".2f"),
           ("marker rate", "marker_rate", ".2f"), ("held-out marker rate", "heldout_marker_rate", ".2f"),
           ("constraints met", "constraint_pass_rate", ".2f"),
           ("chosen", "chosen_score", ".2f"), ("rejected", "rejected_score", ".2f"),
           ("thought chars", "thought_chars", ".0f"), ("response chars", "response_chars", ".0f"),
           ("pairs trained", "pairs_trained", "d"), ("DPO loss", "train_loss", ".3f"),
           ("reward acc", "reward_accuracy", ".2f"), ("margin", "reward_margin", ".3f"),
           ("win rate vs seed", "win_rate", ".2f"), ("length-controlled", "lc_win_rate", ".2f")]


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.md` and `run_dir/report/*.png`; return the path of report.md."""
    run_dir = Path(run_dir)
    rows = _finished_iterations(run_dir)
    logs = {r["iteration"]: io.read_jsonl(rundir.iteration_dir(run_dir, r["iteration"]) / rundir.TRAIN_LOG, missing_ok=True)
            for r in rows}
    evals, notes = _read_evals(run_dir / rundir.EVAL)
    for r in rows:  # the win rate against the seed joins the iteration's row in the table
        seed_eval = next((e for e in evals if e["against"] == "seed" and e["iteration"] == r["iteration"]), {})
        r["win_rate"] = seed_eval.get("win_rate")
        r["lc_win_rate"] = (seed_eval.get("length_controlled") or {}).get("win_rate")
        r["heldout_marker_rate"] = (seed_eval.get("marker_rate") or {}).get(seed_eval.get("model"))

    figures = []  # (heading, file name) of the plots that had something to draw

    def fill(tmp: Path):
        for name, heading, title, panels in ITERATION_FIGURES:
            if _plot_iterations(tmp / name, title, rows, panels):
                figures.append((heading, name))
        if _plot_updates(tmp / "training.png", logs):
            figures.append(("DPO training, per update", "training.png"))
        if _plot_win_rates(tmp / "win_rate.png", evals):
            figures.append(("Win rate", "win_rate.png"))

    io.write_dir(run_dir / rundir.REPORT_PLOTS, fill)  # replaces the plots of an earlier report as a whole
    path = run_dir / rundir.REPORT
    io.write_text(path, _markdown(run_dir, rows, figures, notes))
    return path


# ---------------------------------------------------------------- reading the run directory

def _finished_iterations(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR: {str(run_dir)!r} is not a directory; give the run directory of `minitpo run`")
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(
            f"RUN_DIR: {str(run_dir)!r} has no finished iteration (metrics.jsonl is missing or empty); "
            "run `minitpo run RECIPE --out RUN_DIR` until at least one iteration finishes"
        )
    return rows


def _read_evals(eval_dir: Path) -> tuple[list[dict], list[str]]:
    """Win-rate results as dicts with `iteration` (0 = the seed model) added, and notes on files skipped.
    A file holds one result or a list of them; results for models not named "seed" or "iter-N" are skipped."""
    results, notes = [], []
    for path in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        try:
            data = io.read_json(path)
        except (OSError, UserError):  # one result that does not parse does not stop the report
            notes.append(f"skipped eval/{path.name}: not readable JSON")
            continue
        for item in data if isinstance(data, list) else [data]:
            iteration = rundir.iteration_number(item.get("model")) if isinstance(item, dict) else None
            if iteration is None or _number(item.get("win_rate")) is None:
                notes.append(f"skipped a result in eval/{path.name}: needs \"model\": \"iter-N\" and a numeric \"win_rate\"")
                continue
            results.append({**item, "against": str(item.get("against", "?")), "iteration": iteration})
    return results, notes


def _number(x) -> float | None:
    """x as a finite float, or None for a missing value, a bool, a string or NaN."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _series(rows: list[dict], key: str, x_key: str = "iteration") -> tuple[list, list]:
    """(xs, ys) of `key`, NaN where a row has no number for it: matplotlib breaks the line there, so a
    gap shows as a gap, never as zero or as a line bridging the missing iteration. ([], []) if all are gaps."""
    ys = [_number(r.get(key)) for r in rows]
    if all(y is None for y in ys):
        return [], []
    return [r[x_key] for r in rows], [math.nan if y is None else y for y in ys]


# ---------------------------------------------------------------- plots

def _plot_iterations(path: Path, title: str, rows: list[dict], panels: list[tuple]) -> bool:
    """One figure, one panel per (title, y label, lines, y limits), iterations on x. False if nothing to draw.
    A single panel takes the figure's title and keeps its legend outside, clear of the lines."""
    iterations = [r["iteration"] for r in rows]
    single = len(panels) == 1
    fig = Figure(figsize=(7.2, 4.0) if single else (4.6 * len(panels) + 1.0, 3.8), dpi=120)
    drawn = False
    for i, (panel_title, ylabel, lines, ylim) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key, label, style in lines:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, style, marker="o", label=label)
                drawn = True
        _iteration_axis(ax, iterations)
        ax.set(title=title if single else panel_title, xlabel="iteration", ylabel=ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        if len(ax.get_legend_handles_labels()[1]) > 1:  # a lone line is named by the panel's title
            outside = {"loc": "center left", "bbox_to_anchor": (1.02, 0.5)} if single else {}
            ax.legend(fontsize="small", **outside)
    return drawn and _save(fig, path, None if single else title)


def _plot_updates(path: Path, logs: dict[int, list[dict]]) -> bool:
    """Loss and reward accuracy at every optimizer update, the iterations one after another."""
    fig = Figure(figsize=(11.0, 3.8), dpi=120)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    offset, drawn = 0, False
    for t, log in sorted(logs.items()):
        rows = [{**r, "update": offset + n} for n, r in enumerate(log, start=1)]
        for ax, key in zip(axes, ("loss", "reward_accuracy")):
            xs, ys = _series(rows, key, x_key="update")
            if xs:
                ax.plot(xs, ys, marker=".", color=f"C{(t - 1) % 10}", label=f"iteration {t}")
                drawn = True
        offset += len(log)
        if offset and t != max(logs):
            for ax in axes:
                ax.axvline(offset + 0.5, color="0.8", linewidth=0.8)
    for ax, (panel, ylabel) in zip(axes, (("DPO loss", "loss"), ("Reward accuracy", "chosen reward > rejected"))):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set(title=panel, xlabel="optimizer update (all iterations)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
    axes[1].set_ylim(-0.03, 1.03)
    return drawn and _save(fig, path, "DPO training, one point per optimizer update")


def _plot_win_rates(path: Path, evals: list[dict]) -> bool:
    """Win rate of each iteration's model against each opponent, raw and length-controlled, with their
    confidence intervals."""
    if not evals:
        return False
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    for i, against in enumerate(sorted({e["against"] for e in evals})):
        results = sorted((e for e in evals if e["against"] == against), key=lambda e: e["iteration"])
        xs = [e["iteration"] for e in results]
        ys = [e["win_rate"] for e in results]
        yerr = list(zip(*(_ci_arms(e) for e in results)))  # (2, N): below, above
        ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=4, color=f"C{i}", label=f"against {against}")
        lc = [(e["iteration"], e["length_controlled"]) for e in results if isinstance(e.get("length_controlled"), dict)]
        if lc:  # the length-controlled rate beside it, shifted a little so both intervals show
            ax.errorbar([x + 0.08 for x, _ in lc], [r["win_rate"] for _, r in lc],
                        yerr=list(zip(*(_ci_arms(r) for _, r in lc))), marker="s", linestyle="--", capsize=3,
                        color=f"C{i}", alpha=0.7, label=f"against {against}, length-controlled")
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1, label="tie (0.5)")
    _iteration_axis(ax, [e["iteration"] for e in evals])
    seed_shown = any(e["iteration"] == 0 for e in evals)
    ax.set(title="Win rate on held-out instructions", xlabel="iteration (0 = seed)" if seed_shown else "iteration",
           ylabel="win rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    return _save(fig, path, None)


def _ci_arms(result: dict) -> tuple[float, float]:
    """Error-bar lengths below and above the win rate; 0 where an end of the interval is missing
    (matplotlib refuses negative lengths, so an interval that misses its point is clipped too)."""
    y, low, high = result["win_rate"], _number(result.get("ci_low")), _number(result.get("ci_high"))
    return max(0.0, y - low) if low is not None else 0.0, max(0.0, high - y) if high is not None else 0.0


def _iteration_axis(ax, iterations: list[int]) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(min(iterations) - 0.5, max(iterations) + 0.5)  # one iteration still gets a readable axis
    ax.grid(alpha=0.3)


def _save(fig: Figure, path: Path, title: str | None) -> bool:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return True


# ---------------------------------------------------------------- report.md

def _markdown(run_dir: Path, rows: list[dict], figures: list[tuple[str, str]], notes: list[str]) -> str:
    lines = [f"# minitpo report: {run_dir.resolve().name}", ""]
    lines += [f"Run directory `{run_dir.resolve()}`: {len(rows)} finished iteration{'s' * (len(rows) != 1)}."
              + _recipe_line(run_dir / rundir.RECIPE), ""]
    lines += ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = [_cell(r.get(key), spec) for _, key, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Scores are the judge's raw scores; lengths are means over parsed candidates, in characters; "
              "DPO numbers are means over the last epoch's updates. `-` marks a value the run did not record.", ""]
    for heading, name in figures:
        lines += [f"## {heading}", "", f"![{heading}](report/{name})", ""]
    warnings = [f"iter {r['iteration']}: {w}" for r in rows for w in r.get("warnings") or []]
    if warnings:  # an iteration that trained on nothing, or on few of its pairs
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines += _bench_tables(run_dir, notes)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _bench_tables(run_dir: Path, notes: list[str]) -> list[str]:
    """`minitpo bench`'s tables, one per suite in RUN_DIR/bench/SUITE.json."""
    from minitpo.bench import table

    lines = []
    for path in sorted(rundir.bench_dir(run_dir).glob("*.json")):
        try:
            lines += [f"## Benchmark: {path.stem}", "", table(io.read_json(path)), ""]
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"skipped bench/{path.name}: not a `minitpo bench` result")
    if lines:
        lines += ["Benchmarks: `minitpo bench` (RUN_DIR/bench/); win rates are against the suite's baseline "
                  "answers, judged by the judge named in bench/SUITE.json.", ""]
    return lines


def _recipe_line(path: Path) -> str:
    if not path.is_file():
        return ""
    import yaml

    recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    policy, thought, judge = (recipe.get(k) or {} for k in ("policy", "thought", "judge"))
    return (f" Policy `{policy.get('model', '?')}` ({policy.get('quantization', '?')}), "
            f"template `{thought.get('template', '?')}`, rho {judge.get('rho', '?')}.")


def _cell(value, spec: str) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return format(int(number), spec) if spec == "d" else format(number, spec)
