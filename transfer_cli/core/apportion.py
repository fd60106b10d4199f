"""Split an integer total in proportion to weights, at least 1 each (stage epochs, class counts)."""

from __future__ import annotations


def apportion(weights: list[int], total: int, caps: list[int] | None = None) -> list[int]:
    """Largest-remainder apportionment with a floor of 1 and optional per-item caps.

    The remainder is measured after the floor, so an item lifted to 1 never takes an extra
    unit from a larger one: a smaller weight never gets more than a larger one.
    """
    caps = caps or [total] * len(weights)
    shares = [w * total / sum(weights) for w in weights]
    counts = [min(cap, max(1, int(share))) for share, cap in zip(shares, caps)]
    while sum(counts) < total:
        open_items = [i for i in range(len(counts)) if counts[i] < caps[i]]
        best = max(open_items, key=lambda i: (shares[i] - counts[i], weights[i]))
        counts[best] += 1
    while sum(counts) > total:
        shrinkable = [i for i in range(len(counts)) if counts[i] > 1]
        worst = min(shrinkable, key=lambda i: (shares[i] - counts[i], -weights[i]))
        counts[worst] -= 1
    return counts
