"""The report's "RL algorithms" section: each RL model's gain over its SL model on its own
side's reward model, held out and on train prompts, its KL to the SL model, the
algorithm family of corrected tests, and the reward–KL frontier plot (``frontier.png``).

Reads the evaluation's ``summary.json`` entries ``algorithms``, ``reference_kl``,
``algorithm_differences``, ``algorithm_family``, ``frontier`` and ``train_vs_heldout``
(see `ucai.stages.rl_comparison`).
"""

from __future__ import annotations

from pathlib import Path

from ucai.report_format import count, fmt, interval, p_value, pyplot, save_png, signed, table

ALGORITHM_NAMES = {"ppo": "PPO", "rloo": "RLOO", "dpo": "DPO", "sl": "SL"}


def _side(name: str) -> str:
    return "unethical" if name.endswith("_unethical") else "ethical"


def _algorithm_tests(summary: dict) -> list[dict]:
    """The corrected tests between the evaluated RL and SL models: the algorithm
    family's, and those of the primary family it leaves there (``primary: True``; the
    report's ``rl_<side>`` against its SL model and against the other side)."""
    names = set(summary.get("algorithms") or {})
    primary = [{**d, "primary": True} for d in summary.get("differences", [])
               if d["a"] in names and (d["b"] in names or d["b"] == f"sl_{_side(d['a'])}") and d["column"].startswith("rm_")]
    held = {(d["a"], d["b"], d["column"]) for d in primary}
    return [*primary, *(d for d in summary.get("algorithm_differences", []) if (d["a"], d["b"], d["column"]) not in held)]


def _gain_tests(summary: dict) -> dict[str, dict]:
    """RL model -> its corrected test against the side's SL model on the side's RM."""
    return {
        d["a"]: d
        for d in _algorithm_tests(summary)
        if d["b"] == f"sl_{_side(d['a'])}" and d["column"] == f"rm_{_side(d['a'])}"
    }


def _error_bar(value: float, low: float | None, high: float | None) -> list[list[float]]:
    """matplotlib's [[below], [above]] extents of an interval; a missing end draws none."""
    return [[value - (value if low is None else low)], [(value if high is None else high) - value]]


def plot_frontier(summary: dict, path: Path) -> Path | None:
    """Per side: own reward-model score (y) against KL to the SL model (x, nats per held-out
    answer), the SL model at 0 and one point per algorithm, with 95% intervals."""
    frontier = summary.get("frontier") or {}
    if not frontier:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(frontier), figsize=(5 * len(frontier), 3.6), squeeze=False)
    for axis, (side, points) in zip(axes[0], frontier.items(), strict=True):
        for point in points:
            label = ALGORITHM_NAMES.get(point["algorithm"], point["algorithm"])
            xerr = _error_bar(point["kl"], point["kl_low"], point["kl_high"])
            yerr = _error_bar(point["score"], point["score_low"], point["score_high"])
            axis.errorbar([point["kl"]], [point["score"]], xerr=xerr, yerr=yerr, marker="o", capsize=3, label=label)
        axis.set_title(f"{side}: own reward model vs KL to SL")
        axis.set_xlabel("KL(model ‖ SL), nats per held-out answer")
        axis.set_ylabel(f"rm_{side} score")
        axis.grid(alpha=0.3)
        axis.legend()
    return save_png(fig, path)


def algorithm_rows(summary: dict) -> list[list[str]]:
    tests = _gain_tests(summary)
    kls = summary.get("reference_kl", {})
    gains = summary.get("train_vs_heldout", {})
    rows = []
    for name, algorithm in summary.get("algorithms", {}).items():
        side = _side(name)
        test = tests.get(name)
        kl = kls.get(name)
        train = (gains.get(name) or {}).get("train")
        score = summary["models"].get(name, {}).get(f"rm_{side}", {})
        rows.append(
            [
                name,
                ALGORITHM_NAMES.get(algorithm, algorithm),
                f"{fmt(score.get('mean'))}",
                f"{fmt(kl['mean'], 2)} {interval(kl['low'], kl['high'], 2)}" if kl else "–",
                f"{signed(test['diff'])} {interval(test['low'], test['high'])}{' †' if test.get('primary') else ''}" if test else "–",
                p_value(test["p_adjusted"]) if test else "–",
                f"{signed(train['gain'])} {interval(train['low'], train['high'])} (n = {train['n']})" if train else "–",
            ]
        )
    return rows


def algorithm_section(summary: dict, frontier_plot: Path | None) -> list[str]:
    """The Markdown lines of the section; none when no RL model was evaluated."""
    if not summary.get("algorithms"):
        return []
    family = summary.get("algorithm_family") or {}
    n = summary["prompts"]
    lines = ["", f"## RL algorithms (n = {n} held-out prompts)", ""]
    lines.append(
        "Each RL model against its side's SL model on that side's reward model (rm score in [0, 1]), and its KL to "
        "the SL model: exact KL over the vocabulary, summed over the positions of its own held-out answers "
        "(mean and 95% bootstrap interval over answers). Held-out tests marked † are the primary family's (the "
        "report's rl_<side> against its SL model and against the other side), corrected there; the others form a "
        f"family of their own ({count(family.get('family_size', 0), 'test')}: {family.get('family', 'as listed')}), "
        f"corrected with **{family.get('method_name', family.get('method', 'the same method'))}** at "
        f"α = {family.get('alpha', 0.05)}; the train-prompt gains (uncorrected 95% bootstrap intervals, descriptive) show "
        "over-fitting to the prompts RL trained on when they exceed the held-out gains."
    )
    lines.append("")
    lines += table(
        ["model", "algorithm", "own rm", "KL to SL [95% CI]", "held-out gain over SL [corrected CI]", "adjusted p", "train-prompt gain [95% CI]"],
        algorithm_rows(summary),
    )
    sides = [d for d in _algorithm_tests(summary) if d["b"] != f"sl_{_side(d['a'])}"]
    if sides:
        lines += ["", "Each algorithm's ethical vs unethical model, and the algorithms of one side against each other "
                  "(† corrected in the primary family, the others in the algorithm family):", ""]
        lines += table(
            ["A − B", "scorer", "n", "mean(A − B)", "corrected CI", "adjusted p"],
            [[f"{d['a']} − {d['b']}{' †' if d.get('primary') else ''}", d["column"], str(d["n"]), fmt(d["diff"]),
              interval(d["low"], d["high"]), p_value(d["p_adjusted"])] for d in sides],
        )
    title = "Reward–KL frontier (held-out)"
    lines += ["", f"![{title}]({frontier_plot.name})" if frontier_plot else f"_{title}: no KL measured._"]
    return lines


def _n(tests: dict[str, dict]) -> str:
    """The tests' n, once where they share it."""
    return " and ".join(sorted({str(t["n"]) for t in tests.values()}, key=int))


def what_algorithms_show(summary: dict) -> list[str]:
    """Sentences on whether RL added to SL on both sides, for each algorithm, and which
    algorithms the head-to-head tests separate; only what the corrected tests support."""
    algorithms = summary.get("algorithms") or {}
    tests = _gain_tests(summary)
    by_algorithm: dict[str, dict[str, dict]] = {}
    for name, algorithm in algorithms.items():
        if name in tests:
            by_algorithm.setdefault(algorithm, {})[_side(name)] = tests[name]
    out = []
    for algorithm, sides in by_algorithm.items():
        label = ALGORITHM_NAMES.get(algorithm, algorithm)
        parts = [f"{side} {signed(t['diff'])} (adjusted p {p_value(t['p_adjusted'])})" for side, t in sides.items()]
        significant = [side for side, t in sides.items() if t["significant"] and t["diff"] > 0]
        below = [side for side, t in sides.items() if t["significant"] and t["diff"] < 0]
        if len(significant) == len(sides) == 2:
            verdict = "adds to SL on both sides"
        elif significant:
            verdict = f"adds to SL on the {' and '.join(significant)} side"
            if len(sides) == 2:
                verdict += "; this run does not show a gain on the other"
        else:
            verdict = "shows no gain over SL that survives correction"
        if below:
            verdict += f", and falls below SL on the {' and '.join(below)} side"
        out.append(f"{label} {verdict} (held-out gain on the side's own reward model: {', '.join(parts)}, n = {_n(sides)} prompts).")
    if len(by_algorithm) > 1:
        # Algorithms are ranked only by their head-to-head tests (below), never by the
        # point estimates of their gains.
        head_to_head = [
            d for d in summary.get("algorithm_differences", [])
            if d["a"] in algorithms and d["b"] in algorithms and _side(d["a"]) == _side(d["b"]) and d["b"] != d["a"]
            and algorithms[d["a"]] != algorithms[d["b"]]
        ]
        separated = [d for d in head_to_head if d["significant"]]
        if head_to_head and not separated:
            out.append(f"This run does not show two algorithms differing on a side's own reward model after correction "
                       f"({count(len(head_to_head), 'test')}).")
        for d in separated:
            out.append(f"{d['a']} − {d['b']} on {d['column']}: {signed(d['diff'])} (adjusted p {p_value(d['p_adjusted'])}).")
    return out
