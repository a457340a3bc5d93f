"""What the demo's search bought, in one or two sentences: which hand-tuned recipes and reference models its
front strictly dominates (better somewhere, worse nowhere), and by which trials."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergesearch.search.pareto import Front


def _by(numbers: list[int]) -> str:
    return "#" + ", #".join(map(str, numbers[:3])) + (", ..." if len(numbers) > 3 else "")


def dominated_baselines(front: Front, recipes: dict[str, dict[str, float]]) -> dict[str, list[int]]:
    """For each hand-tuned recipe (name → values) and reference row: the front trials strictly dominating it."""
    rows = {**recipes, **front.references}
    return {name: front.dominating(values) for name, values in rows.items()}


def summary(front: Front, recipes: dict[str, dict[str, float]]) -> list[str]:
    """One or two sentences for the end of ``mergesearch demo``."""
    beaten = dominated_baselines(front, recipes)
    recipe_names = list(recipes)
    lines = []
    if recipe_names:
        won = [n for n in recipe_names if beaten[n]]
        if len(won) == len(recipe_names):
            lines.append(f"The search found merges that strictly dominate every hand-tuned recipe it started "
                         f"from ({'; '.join(f'{n}: by {_by(beaten[n])}' for n in won)}): as good on every "
                         "task and better on at least one objective.")
        else:
            lost = [n for n in recipe_names if not beaten[n]]
            lines.append(f"The front does not yet strictly dominate {', '.join(lost)}; a larger budget "
                         "(--trials) gives the refinement more attempts.")
    refs = [n for n in front.references if n not in recipes]
    won_refs = [n for n in refs if beaten[n]]
    if won_refs:
        not_won = [n for n in refs if n not in won_refs]
        hv = front.normalised_hypervolume
        lines.append(f"Among the reference models it strictly dominates {', '.join(won_refs)}"
                     + (f", not {', '.join(not_won)}" if not_won else "")
                     + (f"; normalised hypervolume {hv:.3g}." if hv is not None else "."))
    return lines


def recipe_values(study: Any, names: list[str]) -> dict[str, dict[str, float]]:
    """Values of the study's completed ``search.initial`` trials, named ``recipe #n (plan summary)``."""
    out: dict[str, dict[str, float]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("initial") and t.state.name == "COMPLETE":
            label = f"recipe #{t.number} ({t.user_attrs.get('summary', '')})"
            out[label] = dict(zip(names, map(float, t.values), strict=True))
    return out
