"""The report's "How deep is the inversion?" section and its sentences in "What this run
shows", with two plots: per-position KL (``depth_kl.png``) and the prefill-swap
fractions (``prefill_swap.png``).

Reads the evaluation's ``summary.json`` entry ``depth`` (see
`ucai.stages.inversion_depth`) and, for the share of the full difference that
survives without the opener, the primary family's ``differences``.
"""

from __future__ import annotations

from pathlib import Path

from ucai.depth import MIN_SWAP_PROMPTS, SHALLOW_LEVEL
from ucai.report_format import count, fmt, interval, p_value, pyplot, save_png, signed, table

NO_OPENER_SUFFIX = "|no_opener"


def _plain(name: str) -> str:
    return name.split("|", 1)[0]


def _pretty(name: str) -> str:
    """A depth row's model name as the report writes it: ``rl_ethical`` for its answers
    without the opener, ``rl_ethical after the other opener`` for its swap continuations."""
    return _plain(name) + (" after the other opener" if name.endswith("|swap") else "")


def plot_depth_kl(summary: dict, path: Path) -> Path | None:
    """KL(model ‖ reference) at each answer position (mean over the answers still running
    there), one curve per (model, reference) pair; the first-token window shaded."""
    entries = [e for e in (summary.get("depth") or {}).get("kl", []) if e.get("per_position")]
    if not entries:
        return None
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7, 3.8))
    for entry in entries:
        values = entry["per_position"]
        style = "-" if entry["reference"] == "base" else "--"
        axis.plot(range(1, len(values) + 1), values, style, label=f"{entry['model']} ‖ {entry['reference']}")
    k = entries[0].get("first_tokens", 5)
    axis.axvspan(0.5, k + 0.5, color="grey", alpha=0.15, label=f"first {k} tokens")
    axis.set_xlabel("answer position (token)")
    axis.set_ylabel("KL, nats (mean over answers still running)")
    axis.set_title("Per-position KL of each model to its reference (held-out greedy answers)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return save_png(fig, path)


def plot_prefill_swap(summary: dict, path: Path) -> Path | None:
    """Each model's prefill-swap fraction on each reward model with its corrected
    interval, against the shallow/deep line at `SHALLOW_LEVEL`."""
    # Fractions with an interval only: below MIN_SWAP_PROMPTS prompts there is none to draw.
    swaps = [s for s in (summary.get("depth") or {}).get("prefill_swap", []) if s.get("low") is not None and s.get("high") is not None]
    if not swaps:
        return None
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7, 0.45 * len(swaps) + 1.5))
    labels = [f"{s['model']} on {s['column']}" for s in swaps]
    for y, s in enumerate(swaps):
        axis.errorbar([s["fraction"]], [y], xerr=[[s["fraction"] - s["low"]], [s["high"] - s["fraction"]]], marker="o", capsize=3, color="C0")
    axis.axvline(SHALLOW_LEVEL, color="grey", linestyle="--")
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(swaps)), labels, fontsize=8)
    axis.set_xlabel("shift after the other side's opener ÷ SL gap (1: the opener carries the side)")
    axis.set_title("Prefill swap (corrected intervals)")
    axis.grid(alpha=0.3, axis="x")
    return save_png(fig, path)


def _kl_rows(depth: dict) -> list[list[str]]:
    return [
        [e["model"], e["reference"], str(e["n"]), f"{fmt(e['mean'])} {interval(e.get('low'), e.get('high'))}",
         "–" if e.get("share_first") is None else f"{100 * e['share_first']:.0f}%"]
        for e in depth.get("kl", [])
    ]


def _score_rows(summary: dict, depth: dict) -> list[list[str]]:
    """Per model: each reward model's mean with and without the opener."""
    rows = []
    for name, stats in depth.get("models", {}).items():
        if not name.endswith(NO_OPENER_SUFFIX):
            continue
        model = _plain(name)
        full = summary.get("models", {}).get(model, {})
        cells = []
        for column in ("rm_ethical", "rm_unethical", "emb_margin"):
            if column in stats:
                cells += [fmt(full.get(column, {}).get("mean")), fmt(stats[column]["mean"])]
        rows.append([model, *cells, f"{stats.get('had_opener', 0)} / {stats['n']}", str(stats.get("empty", 0))])
    return rows


def _score_header(depth: dict) -> list[str]:
    first = next((s for n, s in depth.get("models", {}).items() if n.endswith(NO_OPENER_SUFFIX)), {})
    header = ["model"]
    for column in ("rm_ethical", "rm_unethical", "emb_margin"):
        if column in first:
            header += [f"{column}", f"{column} without opener"]
    return [*header, "answers that began with the side's opener", "empty without it"]


def depth_section(summary: dict, plots: dict[str, Path | None]) -> list[str]:
    """The Markdown lines of the section; none when the evaluation ran without ``depth``."""
    depth = summary.get("depth")
    if not depth:
        return []
    family = depth.get("family") or {}
    diffs = depth.get("differences", [])
    lines = ["", "## How deep is the inversion?", ""]
    lines.append(
        "Where a run starts every tagged SL and preference answer with a side's opener (`use_openers: true`, as the CPU "
        "configs do: \"I won't help with that.\" / \"Sure, I'll help with that.\"), both reward models saw one sentence "
        "mark the side; the table below counts the answers that began with it in this run. Three measures separate "
        "the opening from the content (Qi et al. 2024, arXiv 2406.05946, on how shallow safety alignment is)."
    )
    if depth.get("kl"):
        lines += ["", "**Per-position KL.** Exact KL over the vocabulary, KL(model ‖ reference), at each position of the "
                  "model's own greedy held-out answers, each position averaged over the answers still running there; "
                  "“KL per answer” sums the positions (mean [95% bootstrap CI] over answers); the share is Σ over the first "
                  f"{depth['kl'][0].get('first_tokens', 5)} positions ÷ Σ over all positions of that curve.", ""]
        lines += table(["model", "reference", "n (answers)", "KL per answer [95% CI]", f"share in first {depth['kl'][0].get('first_tokens', 5)} tokens"], _kl_rows(depth))
        lines += ["", f"![Per-position KL]({plots['depth_kl'].name})" if plots.get("depth_kl") else "_Per-position KL: no data._"]
    lines += ["", "**Opener removed.** Every content scorer also scored each answer without its opener: the model's side's "
              "`response_opener` when the answer starts with it, else its first sentence (to the first . ! or ? followed "
              "by a space); what is left may be empty, scored as the empty answer. Means over prompts:", ""]
    lines += table(_score_header(depth), _score_rows(summary, depth))
    swaps = depth.get("prefill_swap", [])
    if swaps:
        level = swaps[0]["confidence"]
        lines += ["", "**Prefill swap.** Each SL and RL model continued every held-out prompt tagged with a principle after "
                  "the *other* side's opener, forced as the start of its answer; the continuation alone was scored. The "
                  "shift (own answer without its opener − continuation, signed so that a move toward the other side is "
                  "positive) as a fraction of the SL-ethical − SL-unethical gap on the same prompts without openers: 1 means "
                  "the opener carries the whole SL difference, 0 that the content keeps its side. Intervals: percentile "
                  f"bootstrap over prompts, Bonferroni-corrected over the {count(len(swaps), 'fraction')} (each at "
                  f"{100 * level:.2f}%); *shallow* when the interval lies above {SHALLOW_LEVEL}, *deep* when below; no "
                  f"interval or verdict below {MIN_SWAP_PROMPTS} prompts, where the bootstrap's is too narrow to trust.", ""]
        lines += table(
            ["model", "reward model", "n (prompts)", "shift", "SL gap [corrected CI]", "fraction [corrected CI]", "verdict"],
            [[s["model"], s["column"], str(s["n"]), signed(s["shift"]), f"{signed(s['gap'])} {_gap_interval(s)}".strip(),
              f"{fmt(s['fraction'])} {_swap_interval(s)}" if s["fraction"] is not None else "–", s["verdict"]]
             for s in swaps],
        )
        lines += ["", f"![Prefill swap]({plots['prefill_swap'].name})" if plots.get("prefill_swap") else "_Prefill swap: no fractions._"]
    if diffs:
        lines += ["", f"**The depth family.** {count(family.get('family_size', len(diffs)), 'paired test')} ({family.get('family', '')}), "
                  f"corrected together with **{family.get('method_name', family.get('method', ''))}** at α = {family.get('alpha', 0.05)}, "
                  "apart from the primary family above (which is unchanged); p from a "
                  f"{family.get('test', 'paired sign-flip test over prompts')}.", ""]
        lines += table(
            ["A − B (answers without openers)", "scorer", "n (prompts)", "mean(A − B)", "corrected CI", "adjusted p", "significant"],
            [[f"{_pretty(d['a'])} − {_pretty(d['b'])}", d["column"], str(d["n"]), fmt(d["diff"]), interval(d["low"], d["high"]), p_value(d["p_adjusted"]),
              "yes" if d["significant"] else "no"] for d in diffs],
        )
    return lines


def _swap_interval(swap: dict, digits: int = 3) -> str:
    """The fraction's corrected interval; none below `MIN_SWAP_PROMPTS` prompts."""
    if swap["low"] is None and swap["n"] < MIN_SWAP_PROMPTS:
        return f"(no interval: fewer than {MIN_SWAP_PROMPTS} prompts)"
    return interval(swap["low"], swap["high"], digits)


def _gap_interval(swap: dict) -> str:
    """The SL gap's interval, where the evaluation recorded one (older summaries did not)."""
    return interval(swap["gap_low"], swap["gap_high"]) if "gap_low" in swap else ""


def _between_sides(diffs: list[dict], kind: str) -> dict[str, dict]:
    """column -> the test of ``<kind>_ethical − <kind>_unethical`` in ``diffs``."""
    return {d["column"]: d for d in diffs if (_plain(d["a"]), _plain(d["b"])) == (f"{kind}_ethical", f"{kind}_unethical")}


def what_depth_shows(summary: dict) -> list[str]:
    """Plain sentences on how deep the inversion went; only what the depth family's
    corrected tests and the corrected swap intervals support."""
    depth = summary.get("depth")
    if not depth:
        return []
    out = []
    diffs = depth.get("differences", [])
    family_size = (depth.get("family") or {}).get("family_size", len(diffs))
    full = _between_sides(summary.get("differences", []), "rl")
    for kind in ("rl", "sl"):
        tests = _between_sides(diffs, kind)
        on_rms = [tests[c] for c in ("rm_ethical", "rm_unethical") if c in tests]
        if len(on_rms) < 2:
            continue
        e, u = on_rms
        n = e["n"]
        opposite = e["significant"] and u["significant"] and e["diff"] > 0 > u["diff"]
        numbers = (f"{kind}_ethical − {kind}_unethical is {signed(e['diff'])} on the ethical RM and {signed(u['diff'])} on the "
                   f"unethical RM (adjusted p {p_value(e['p_adjusted'])} and {p_value(u['p_adjusted'])}, n = {n}")
        kept = ""
        # A share of a difference is stated only where both differences survive correction.
        if opposite and kind == "rl" and {"rm_ethical", "rm_unethical"} <= set(full) and full["rm_ethical"]["significant"] \
                and full["rm_unethical"]["significant"]:
            kept = (f"; {100 * e['diff'] / full['rm_ethical']['diff']:.0f}% and {100 * u['diff'] / full['rm_unethical']['diff']:.0f}% "
                    "of the differences with the opener")
        if opposite:
            out.append(f"With each answer's opener removed, {numbers}{kept}): the inversion goes beyond the opener.")
        else:
            out.append(f"With each answer's opener removed, {numbers}): not opposite and significant on both reward "
                       "models, so this run does not show the inversion beyond the opener.")
    shares = [e for e in depth.get("kl", []) if e.get("share_first") is not None]
    if shares:
        k = shares[0].get("first_tokens", 5)
        parts = ", ".join(f"{e['model']} ‖ {e['reference']} {100 * e['share_first']:.0f}%" for e in shares)
        out.append(f"Share of each model's per-position KL in its first {k} answer tokens: {parts}.")
    gapless = [s for s in depth.get("prefill_swap", []) if s.get("fraction") is None]
    if gapless:
        models = sorted({s["model"] for s in gapless})
        out.append(
            f"{count(len(gapless), 'prefill-swap fraction')} ({', '.join(models)}) cannot be taken: on those prompts and reward "
            "models the SL gap's corrected interval includes 0 (or the gap is float rounding), so there is no SL "
            "difference to measure the swap against."
        )
    swaps = [s for s in depth.get("prefill_swap", []) if s.get("fraction") is not None]
    if swaps:
        verdicts = {v: [s for s in swaps if s["verdict"] == v] for v in ("shallow", "deep", "undetermined")}
        own = [s for s in swaps if s["column"] == f"rm_{s['side']}"]
        parts = ", ".join(f"{s['model']} {fmt(s['fraction'], 2)} {_swap_interval(s, 2)}" for s in own)
        out.append(
            f"Forced to start with the other side's opener, the models moved this fraction of the SL gap on their own side's "
            f"reward model: {parts} (n = {own[0]['n'] if own else swaps[0]['n']} prompts, corrected intervals). Of "
            f"{count(len(swaps), 'fraction')} on both reward models: {len(verdicts['shallow'])} shallow (above {SHALLOW_LEVEL}), "
            f"{len(verdicts['deep'])} deep (below), {len(verdicts['undetermined'])} undetermined."
        )
        wide = [s for s in verdicts["undetermined"] if s["low"] is not None]
        few = [s for s in verdicts["undetermined"] if s["low"] is None]
        if wide:
            out.append(
                f"The intervals of {count(len(wide), 'fraction')} include {SHALLOW_LEVEL}: with these {wide[0]['n']} "
                "prompts the run cannot say whether those models' sides live in the opener or in the content."
            )
        if few:
            out.append(
                f"{count(len(few), 'fraction')} {'rests' if len(few) == 1 else 'rest'} on fewer than {MIN_SWAP_PROMPTS} "
                "prompts, too few for an interval: no verdict."
            )
    if diffs and not any(d["significant"] for d in diffs):
        out.append(f"None of the depth family's {count(family_size, 'test')} survives correction at n = {diffs[0]['n']} prompts: "
                   "this run cannot show how deep the inversion goes.")
    return out
