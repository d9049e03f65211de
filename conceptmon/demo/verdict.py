"""What the demo may conclude from its own run: pure functions of its tables and accuracies.

The paper's first observation is that, in the last layer, more neurons are
interpretable at the last epoch than at epoch 0 and the neurons spread out in the
embedding. The demo states it only when its run shows it *and* the run learned
(:func:`learned`): a network that did not learn its task says nothing about what
training does to neurons. A ``--tiny`` run is a smoke test and never states it.
"""
from __future__ import annotations

import pandas as pd

LEARNED_RATIO = 2.0
"""Validation accuracy must be at least this multiple of chance ..."""
LEARNED_MARGIN = 0.20
"""... and at least this much (20 points) above it."""

PAPER_OBSERVATION = ("more interpretable neurons at the last epoch than at epoch 0 in the last layer, "
                     "and the embedding spreading out")


def observation(tables: dict[str, pd.DataFrame], layer: str) -> dict:
    """The paper's first observation, measured on ``layer``: first vs last epoch."""
    counts = tables["interpretable"]
    counts = counts[counts["layer"] == layer].sort_values("epoch")
    diversity = tables["diversity"]
    diversity = diversity[diversity["layer"] == layer].sort_values("epoch")
    first, last = counts.iloc[0], counts.iloc[-1]
    spread = diversity["mean_cosine_distance"].to_numpy()
    distinct = diversity["n_distinct_interpretable"].to_numpy()
    result = {
        "layer": layer,
        "first_epoch": int(first["epoch"]),
        "last_epoch": int(last["epoch"]),
        "n_neurons": int(last["n_neurons"]),
        "interpretable_first": int(first["n_interpretable"]),
        "interpretable_last": int(last["n_interpretable"]),
        "spread_first": float(spread[0]),
        "spread_last": float(spread[-1]),
        "distinct_concepts_first": int(distinct[0]),
        "distinct_concepts_last": int(distinct[-1]),
    }
    result["shown"] = bool(result["interpretable_last"] > result["interpretable_first"]
                           and result["spread_last"] > result["spread_first"])
    return result


def learning_bar(chance: float) -> float:
    """The validation accuracy from which a run counts as having learned."""
    return max(LEARNED_RATIO * chance, chance + LEARNED_MARGIN)


def learned(val_acc: float, chance: float) -> bool:
    """Clearly above chance: at least twice chance and at least 20 points above it."""
    return val_acc >= learning_bar(chance)


def percent(value: float) -> str:
    """0.0625 -> '6.25 %', 0.9 -> '90 %': two decimals at most, trailing zeros dropped."""
    return f"{100 * value:.2f}".rstrip("0").rstrip(".") + " %"


def claims_observation(obs: dict, val_acc: float, chance: float, *, smoke: bool = False) -> bool:
    """Whether the demo may state the paper's observation: shown by a run that learned, not a smoke run."""
    return not smoke and learned(val_acc, chance) and obs["shown"]


def describe(obs: dict) -> str:
    """What the run measured in its last layer, without a verdict."""
    return (
        f"{obs['layer']}: interpretable neurons {obs['interpretable_first']}/{obs['n_neurons']} at epoch "
        f"{obs['first_epoch']} -> {obs['interpretable_last']}/{obs['n_neurons']} at epoch {obs['last_epoch']}; "
        f"distinct concepts {obs['distinct_concepts_first']} -> {obs['distinct_concepts_last']}; "
        f"embedding spread (mean cosine distance) {obs['spread_first']:.3f} -> {obs['spread_last']:.3f}"
    )


def describe_validation(report: dict) -> str:
    """The last validated epoch: how many output units the detector names by their own class."""
    r = report["results"][-1]
    n = r["n_units"]
    return (f"{r['layer']} at epoch {r['epoch']}: the detector names {round(r['top1'] * n)}/{n} output units by "
            f"their class (top-1 {percent(r['top1'])}), {round(r['top5'] * n)}/{n} within its first five "
            f"(top-5 {percent(r['top5'])})")


def _what_changed(obs: dict) -> str:
    gained = obs["interpretable_last"] - obs["interpretable_first"]
    counts = "more" if gained > 0 else "fewer" if gained < 0 else "no more"
    spread = "spread out" if obs["spread_last"] > obs["spread_first"] else "did not spread out"
    return (f"{counts} interpretable neurons in {obs['layer']} at epoch {obs['last_epoch']} than at epoch "
            f"{obs['first_epoch']} ({obs['interpretable_first']} -> {obs['interpretable_last']} of "
            f"{obs['n_neurons']}), and the embedding {spread} ({obs['spread_first']:.3f} -> {obs['spread_last']:.3f})")


def closing_line(obs: dict, val_acc: float, chance: float, *, smoke: bool = False) -> str:
    """The demo's last word: the paper's observation only when this run learned and showed it."""
    accuracy = f"{percent(val_acc)} validation accuracy, chance is {percent(chance)}"
    if smoke:
        return (f"smoke run (--tiny): too small to test the paper's observation; it saw {_what_changed(obs)}; "
                f"{accuracy}")
    if not learned(val_acc, chance):
        return (f"the run did not learn: {accuracy} (learning means at least {percent(learning_bar(chance))}), so it "
                f"cannot test the paper's observation; it saw {_what_changed(obs)}")
    if claims_observation(obs, val_acc, chance):
        return f"the paper's observation holds on this run: {_what_changed(obs)}; {accuracy}"
    return (f"the run learned ({accuracy}) but did not show the paper's observation ({PAPER_OBSERVATION}): "
            f"it saw {_what_changed(obs)}")


def judge(obs: dict, val_acc: float, chance: float, *, smoke: bool = False) -> dict:
    """The verdict as ``demo.json`` records it: the inputs, each test, and the closing line."""
    return {"val_acc": val_acc, "chance": chance, "learned": learned(val_acc, chance), "smoke": smoke,
            "states_observation": claims_observation(obs, val_acc, chance, smoke=smoke),
            "line": closing_line(obs, val_acc, chance, smoke=smoke)}
