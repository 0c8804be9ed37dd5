"""Where ``tune`` looks: a global scale by grid-then-bisection, then (optionally) a scale per layer group.

Both searches call ``evaluate(scales) -> Candidate`` at most ``budget`` times and never the same point
twice. They assume what the measurements show on every pair tried: uptake rises with the scale until
it saturates, and retention falls (not always monotonically), so the best feasible scale sits at the
retention boundary or at the uptake peak, whichever comes first.

*Global*: ``budget // 2`` evenly spaced scales over ``(lo, hi]`` (``lo`` itself is the VLM, known
feasible), then bisection between the best feasible scale and its nearer neighbour that is either
infeasible (the boundary) or lower in uptake (a peak), until the bracket is narrower than
``min_step`` or the budget is spent.

*Per layer group* (AdaMerging's idea, Yang et al. ICLR 2024: merge coefficients per layer, learned from
unlabelled inputs; here derivative-free, on this objective): from the global pick, coordinate moves
of ``step`` on one group's scale (raise one group, or move ``step`` from one group to another);
a move is kept when it is feasible and raises uptake; ``step`` halves when no move helps.
"""

from __future__ import annotations

from collections.abc import Callable

from .objective import Candidate, best

Evaluate = Callable[[tuple[float, ...], str], Candidate]


def _key(scales: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(s), 6) for s in scales)


def global_search(evaluate: Evaluate, start: Candidate, lo: float, hi: float, budget: int,
                  min_step: float | None = None) -> list[Candidate]:
    """Scored candidates of one global scale in [lo, hi]; ``start`` is the candidate at ``lo``."""
    if budget < 1:
        return [start]
    min_step = min_step if min_step is not None else (hi - lo) / 100
    seen: dict[tuple[float, ...], Candidate] = {_key(start.scales): start}

    def run(s: float, stage: str) -> None:
        seen[_key((s,))] = evaluate((s,), stage)

    n_grid = max(1, min(budget, budget // 2 if budget >= 4 else budget))
    for k in range(1, n_grid + 1):
        run(lo + (hi - lo) * k / n_grid, "grid")
    used = n_grid
    while used < budget:
        cands = sorted(seen.values(), key=lambda c: c.scale)
        b = best(cands) or cands[0]
        i = cands.index(b)
        right = cands[i + 1] if i + 1 < len(cands) else None
        left = cands[i - 1] if i > 0 else None
        options = []
        if right is not None:
            options.append((right.scale - b.scale, (b.scale + right.scale) / 2))
        if left is not None and right is not None and right.feasible:  # a peak inside: look on both sides
            options.append((b.scale - left.scale, (left.scale + b.scale) / 2))
        options = [o for o in options if o[0] >= 2 * min_step and _key((o[1],)) not in seen]
        if not options:
            break
        run(max(options)[1], "refine")
        used += 1
    return sorted(seen.values(), key=lambda c: c.scale)


def group_search(evaluate: Evaluate, start: Candidate, budget: int, step: float,
                 min_step: float = 0.0) -> list[Candidate]:
    """Scored candidates of per-group scales, starting from ``start`` (all groups at the global pick)."""
    seen: dict[tuple[float, ...], Candidate] = {_key(start.scales): start}
    current = start
    used = 0
    n = len(start.scales)
    while used < budget and step > min_step:
        moves: list[tuple[float, ...]] = []
        for g in range(n):
            up = list(current.scales)
            up[g] += step
            moves.append(tuple(up))
        for g in range(n):
            for h in range(n):
                if g != h and current.scales[g] >= step:
                    t = list(current.scales)
                    t[g] -= step
                    t[h] += step
                    moves.append(tuple(t))
        improved = False
        for m in moves:
            if used >= budget:
                break
            if _key(m) in seen:
                continue
            c = evaluate(m, "per-layer")
            seen[_key(m)] = c
            used += 1
            if c.feasible and c.uptake > current.uptake:
                current = c
                improved = True
                break
        if not improved:
            step /= 2
    return list(seen.values())
