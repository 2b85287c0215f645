"""Seed statistics for ablation tables: mean ± std over seeds, and the paired (same-seed)
difference of an arm from its baseline with a t-test mark, so a table says whether an
arm's difference is the knob's or seed noise.

Pairing by seed removes what the arms of one seed share (the initial weights, the data
order, the held-out set), which is most of the run-to-run variance in our CPU ablations.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Optional

# two-sided 95% t quantiles t(0.975, n - 1), by the number of pairs n
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
         10: 2.262}


def mean_std(values: Iterable[float], digits: int = 3) -> str:
    """``"m ± s"`` of ``values`` (s: sample std, 0 for one value); ``"-"`` for none."""
    vals = [float(v) for v in values]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def paired_diffs(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]], key: str
                 ) -> list[float]:
    """``row[key] - base[key]`` for every seed both have a value for, in ``rows``' order."""
    base = {r["seed"]: r.get(key) for r in base_rows}
    return [r[key] - base[r["seed"]] for r in rows
            if r.get(key) is not None and base.get(r["seed"]) is not None]


def beyond_noise(diffs: list[float], floor: float = 5e-4) -> Optional[bool]:
    """Whether the mean paired difference is beyond seed noise at 95% (two-sided t-test:
    ``|mean| > t(0.975, n-1) * std / sqrt(n)``) and at least ``floor``; None under 2 pairs."""
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    t = T_975.get(len(diffs), 2.0)
    return abs(mean) >= floor and abs(mean) > t * sd / math.sqrt(len(diffs))


def paired_cell(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]], key: str,
                digits: int = 3) -> str:
    """``"+d ± s"`` of the same-seed differences from the baseline, with `` *`` when
    beyond seed noise (``beyond_noise``); ``"-"`` with fewer than two pairs."""
    diffs = paired_diffs(rows, base_rows, key)
    if len(diffs) < 2:
        return "-"
    mark = " *" if beyond_noise(diffs) else ""
    return f"{statistics.fmean(diffs):+.{digits}f} ± {statistics.stdev(diffs):.{digits}f}{mark}"
