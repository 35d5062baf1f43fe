"""The tables and figures of a ``pilm scale`` folder: its rows (one per method, PRM, N and
problem) summarised per (method, PRM, N) with 95% Wilson intervals over problems, as a
markdown table and as accuracy against tokens per problem; and each method against the
particle filter on the same problems (McNemar's exact test), the paired reading the
unpaired intervals cannot give."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ..evaluation.metrics import mcnemar, sign_flip, wilson
from ..extras import pyplot

METHODS = ("greedy", "sc", "bon", "wbon", "beam", "beam-all", "dvts", "pf", "pf-twisted", "pg")  # pilm scale's, in table order


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cell_rows(path: Path) -> list[dict]:
    """The rows as the tables group them. Where one PRM name's rows come from more than one PRM
    folder (two learned PRMs run into one folder), each such row's ``prm`` also names its folder,
    ``learned (path)``, so that no table merges them (the file itself is left as it is)."""
    rows = read_rows(path)
    folders: dict[str, set[str]] = {}
    for r in rows:
        if r.get("prm_path"):
            folders.setdefault(r["prm"], set()).add(r["prm_path"])
    for r in rows:
        if len(folders.get(r["prm"], ())) > 1:
            r["prm"] = f"{r['prm']} ({r['prm_path']})"
    return rows


def _right(rows_path: str | Path) -> dict[tuple, dict[int, bool]]:
    """Per (method, PRM, N): problem -> whether it was right."""
    right: dict[tuple, dict[int, bool]] = {}
    for r in cell_rows(Path(rows_path)):
        right.setdefault((r["method"], r["prm"], r["n"]), {})[r["problem"]] = bool(r["correct"])
    return right


def summarise(rows_path: str | Path) -> list[dict]:
    """One entry per (method, PRM, N): accuracy, its 95% interval, problems, mean tokens (policy +
    judge) and seconds per problem, the judge's share of those tokens (``prm_share``), and tokens
    per second of the whole run (policy + judge tokens over its seconds)."""
    cells: dict[tuple, list[dict]] = {}
    for r in cell_rows(Path(rows_path)):
        cells.setdefault((r["method"], r["prm"], r["n"]), []).append(r)
    out = []
    for (method, prm, n), rows in sorted(cells.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1], kv[0][2])):
        k = sum(r["correct"] for r in rows)
        lo, hi = wilson(k, len(rows))
        spent, seconds = sum(r["tokens"] + r["prm_tokens"] for r in rows), sum(r["seconds"] for r in rows)
        out.append({"method": method, "prm": prm, "n": n, "problems": len(rows), "accuracy": k / len(rows),
                    "low": lo, "high": hi, "tokens": spent / len(rows), "seconds": seconds / len(rows),
                    "prm_share": sum(r["prm_tokens"] for r in rows) / spent if spent else 0.0,
                    "tokens_per_second": spent / seconds if seconds else math.nan})
    return out


def table(summary: list[dict]) -> str:
    """The summary as a markdown table: accuracy [95% interval], tokens per problem, the judge's
    share of them and tokens per second (self-consistency and both best-of-N selections report
    the seconds of their one shared run, process rewards included)."""
    lines = ["| method | PRM | N | accuracy [95% CI] | tokens / problem | PRM share | tokens / s | problems |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['prm']} | {s['n']} | {s['accuracy']:.2f} [{s['low']:.2f}, {s['high']:.2f}] "
                     f"| {s['tokens']:.0f} | {s['prm_share']:.0%} | {s['tokens_per_second']:.1f} | {s['problems']} |")
    if any(s["method"] in ("sc", "bon", "wbon") for s in summary):
        lines.append("\nsc, bon and wbon select from one shared run of N chains, and report its seconds (PRM scoring "
                     "included) and its tokens.")
    return "\n".join(lines)


def paired(rows_path: str | Path, reference: str = "pf") -> list[dict]:
    """Each method against ``reference`` on the problems both ran, per (PRM, N) where the
    reference ran: the problems only the method gets right, only the reference, and McNemar's
    exact p (``pilm.evaluation.metrics.mcnemar``). A method without a PRM (self-consistency,
    greedy) meets a reference of any PRM, and a reference without one meets every PRM's
    methods; greedy meets the others at every N. Each entry names both sides' own PRM and N."""
    right = _right(rows_path)
    order = lambda key: (METHODS.index(key[0]), key[1], key[2])  # noqa: E731
    out = []
    for _, ref_prm, n in sorted((k for k in right if k[0] == reference), key=order):
        ref = right[(reference, ref_prm, n)]
        for (method, prm, k), cell in sorted(right.items(), key=lambda kv: order(kv[0])):
            same_prm = prm == ref_prm or "none" in (prm, ref_prm)
            same_n = k == n or "greedy" in (method, reference)
            both = sorted(set(cell) & set(ref))
            if method == reference or not (same_prm and same_n and both):
                continue
            only, only_ref, p = mcnemar([cell[i] for i in both], [ref[i] for i in both])
            out.append({"method": method, "prm": prm, "n": k, "reference": reference, "reference_prm": ref_prm,
                        "reference_n": n, "problems": len(both), "right": sum(cell[i] for i in both),
                        "reference_right": sum(ref[i] for i in both), "only_method": only,
                        "only_reference": only_ref, "p": p})
    return out


def paired_table(comparisons: list[dict]) -> str:
    """``paired`` as a markdown table."""
    lines = ["| method (PRM, N) | reference (PRM, N) | problems | right | reference right | only the method / only "
             "the reference | McNemar p |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['method']} ({c['prm']}, {c['n']}) | {c['reference']} ({c['reference_prm']}, "
                     f"{c['reference_n']}) | {c['problems']} | {c['right']} | {c['reference_right']} | "
                     f"{c['only_method']} / {c['only_reference']} | {c['p']:.3g} |")
    return "\n".join(lines)


def growth(rows_path: str | Path, reference: str = "pf") -> list[dict]:
    """What a larger budget buys, paired on the same problems: per PRM, between the two largest N
    the ``reference`` ran with it (``low`` -> ``high``). For each method run at both with that PRM
    (or none): the problems right only at ``high`` and only at ``low``, and McNemar's exact p
    between the two N (``"against": None``). Then the reference's gain against each other
    method's, on the problems all four cells ran: per problem d = (the reference's change) -
    (the method's change), each change -1, 0 or 1; ``net`` = sum of d, how many more problems the
    reference gained; the problems with d > 0 and d < 0; and the exact sign-flip test's p of the
    net (``metrics.sign_flip``). This is "scales better" read as a rate, one method's growth
    against another's, which comparisons at each N do not test."""
    right = _right(rows_path)
    out: list[dict] = []
    counted: set[tuple] = set()  # a method without a PRM meets every PRM's filter: its own change once
    for ref_prm in sorted({k[1] for k in right if k[0] == reference}):
        ns = sorted(k[2] for k in right if k[:2] == (reference, ref_prm))
        if len(ns) < 2:
            continue
        low, high = ns[-2], ns[-1]
        change: dict[tuple[str, str], dict[int, int]] = {}
        for method in METHODS:
            for prm in (ref_prm, "none"):
                lo, hi = right.get((method, prm, low)), right.get((method, prm, high))
                if lo and hi and (both := sorted(set(lo) & set(hi))):
                    change[(method, prm)] = {i: hi[i] - lo[i] for i in both}
        for (method, prm), c in change.items():
            if (method, prm, low, high) in counted:
                continue
            counted.add((method, prm, low, high))
            only_high, only_low, p = mcnemar([c[i] > 0 for i in c], [c[i] < 0 for i in c])
            out.append({"method": method, "prm": prm, "low": low, "high": high, "against": None,
                        "problems": len(c), "first": only_high, "second": only_low, "p": p})
        ref = change.get((reference, ref_prm), {})
        for (method, prm), c in change.items():
            if method == reference or not (both := sorted(set(ref) & set(c))):
                continue
            d = [ref[i] - c[i] for i in both]
            out.append({"method": reference, "prm": ref_prm, "low": low, "high": high, "against": method,
                        "against_prm": prm, "problems": len(both), "net": sum(d), "first": sum(x > 0 for x in d),
                        "second": sum(x < 0 for x in d), "p": sign_flip(d)})
    return out


def growth_table(rows: list[dict]) -> str:
    """``growth`` as two markdown tables: each method's own change, then the reference's against
    each other method's."""
    own = ["| method (PRM) | N | problems | right only at the larger N / only at the smaller | McNemar p |",
           "|---|---|---|---|---|"]
    own += [f"| {g['method']} ({g['prm']}) | {g['low']} → {g['high']} | {g['problems']} | {g['first']} / "
            f"{g['second']} | {g['p']:.3g} |" for g in rows if g["against"] is None]
    vs = ["| method (PRM) | against (PRM) | N | problems | net: problems gained more | problems where it gained "
          "more / less | sign-flip p |", "|---|---|---|---|---|---|---|"]
    vs += [f"| {g['method']} ({g['prm']}) | {g['against']} ({g['against_prm']}) | {g['low']} → {g['high']} | "
           f"{g['problems']} | {g['net']:+d} | {g['first']} / {g['second']} | {g['p']:.3g} |"
           for g in rows if g["against"] is not None]
    return "\n".join(own) + ("\n\n" + "\n".join(vs) if len(vs) > 2 else "")


def families(comparisons: list[dict], grown: list[dict]) -> dict[str, int]:
    """How many distinct tests the tables hold per PRM, the k a Bonferroni bound over that PRM's
    family divides 0.05 by: each pair of cells (``paired`` of any reference) once, however many
    tables list it, and each ``growth`` test. A test belongs to the PRM of its cells (``paired``
    and ``growth`` never meet two PRMs); tests where no cell has a PRM (greedy against
    self-consistency, self-consistency's own change) make the family ``"none"``. Pairs with no
    discordant problem (p = 1) count too, as the tables list them: a conservative k."""
    def family(*prms: str | None) -> str:
        found = {p for p in prms if p is not None and p != "none"}
        if len(found) > 1:
            raise ValueError(f"a test between cells of two PRMs, {sorted(found)}, belongs to no one family")
        return found.pop() if found else "none"

    pairs = {frozenset({(c["method"], c["prm"], c["n"]), (c["reference"], c["reference_prm"], c["reference_n"])}):
             family(c["prm"], c["reference_prm"]) for c in comparisons}
    sizes = Counter([*pairs.values(), *(family(g["prm"], g.get("against_prm")) for g in grown)])
    return dict(sorted(sizes.items()))


def families_text(sizes: dict[str, int]) -> str:
    """``families`` as a sentence, each family with the p its tests need after a Bonferroni bound."""
    parts = ", ".join(f"{prm} {k} (0.05 / {k} = {0.05 / k:.2g})" for prm, k in sizes.items())
    return ("Distinct tests per PRM, the pairs above each counted once and the growth tests of table.md (tests "
            "with no PRM on either side counted as none), and the p a test needs to be resolved after a Bonferroni "
            f"bound over its family: {parts}.")


def report(rows_path: str | Path) -> str:
    """A folder's table.md: ``table`` of its summary, then ``paired_table`` against the
    particle filter where it ran, and ``growth`` (per PRM, between the filter's two largest N)."""
    text = table(summarise(rows_path))
    if comparisons := paired(rows_path):
        text += ("\n\nEach method against the particle filter (paper weights) on the same problems (McNemar's exact "
                 "test):\n\n" + paired_table(comparisons))
    if grown := growth(rows_path):
        text += ("\n\nWhat the larger budget buys, per PRM between the particle filter's two largest N, on the same "
                 "problems: each method's own change (McNemar's exact test between the two N), then whether the "
                 "filter gained more than each other method with the same PRM (per problem, the filter's change "
                 "minus the method's, each change -1, 0 or 1; the net is their sum, tested by the exact sign-flip "
                 "test): \"scales better\" read as a rate. No p-value here is corrected for the others.\n\n"
                 + growth_table(grown))
    return text + "\n"


def panels(summary: list[dict]) -> list[str]:
    """The PRMs ``plot`` gives a panel each: verifier, learned, judge, then any other, each learned
    folder its own (``cell_rows``); ``["none"]`` when no method used one."""
    order = {"verifier": 0, "learned": 1, "judge": 2}
    return sorted({s["prm"] for s in summary} - {"none"}, key=lambda p: (order.get(p.split(" (")[0], 3), p)) or ["none"]


def plot(summary: list[dict], path: str | Path) -> None:
    """Accuracy against tokens per problem (log scale), one panel per process reward, one line
    per method (self-consistency in every panel, greedy as a dashed level), 95% intervals."""
    plt = pyplot()
    import matplotlib.ticker

    prms = panels(summary)
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, len(prms), figsize=(4.2 * len(prms), 4), sharey=True, squeeze=False)
    for ax, prm in zip(axes[0], prms):
        for method in METHODS:
            cells = sorted((s for s in summary if s["method"] == method and s["prm"] in (prm, "none")),
                           key=lambda c: c["tokens"])
            if not cells:
                continue
            if method == "greedy":
                ax.axhline(cells[0]["accuracy"], color=colours[method], ls="--", lw=1, label="greedy")
                continue
            err = [[c["accuracy"] - c["low"] for c in cells], [c["high"] - c["accuracy"] for c in cells]]
            ax.errorbar([c["tokens"] for c in cells], [c["accuracy"] for c in cells], yerr=err, marker="o",
                        capsize=2, color=colours[method], label=method, alpha=0.85)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"PRM: {prm}")
        ax.set_xlabel("tokens per problem (policy + PRM)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (95% interval)")
    for ax in axes[0]:  # each panel names its own methods
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
