"""``matplotlib.pyplot`` when it is there: plots are extras next to the JSON/CSV records, and the
lent GPU machine has no matplotlib (or a carried wheel that does not fit its numpy)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = ["pyplot"]


def pyplot() -> Tuple[Optional[Any], str]:
    """``(matplotlib.pyplot on the Agg backend, "")`` or ``(None, why it cannot be imported)``."""
    try:
        import matplotlib
    except Exception as e:  # missing, or a wheel that does not fit the machine
        return None, f"{type(e).__name__}: {e}"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, ""
