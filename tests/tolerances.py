"""Inequalities between floats with the tolerance they mean, stated once on one side.

``a * (1 + e) <= b * (1 + e)`` is the same test as ``a <= b``: a chained comparison that puts the
same factor on both sides tolerates nothing, and fails by one ulp on some machines. Every
inequality between computed floats in the suite goes through :func:`assert_le` instead.
"""


def assert_le(a, b, *, rtol: float = 0.0, atol: float = 0.0, what: str = "") -> None:
    """Assert ``a ≤ b + rtol·|b| + atol``: ``a`` is at most ``b``, up to the stated rounding."""
    a, b = float(a), float(b)
    slack = rtol * abs(b) + atol
    assert a <= b + slack, (
        f"{what + ': ' if what else ''}{a!r} > {b!r} by {a - b:.3g}, more than the allowed "
        f"{slack:.3g} (rtol={rtol:g}, atol={atol:g})"
    )
