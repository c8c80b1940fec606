"""Seed statistics for the ablation sweep: mean, spread and confidence interval per cell, and tests against a baseline.

A sweep cell is one variant trained with several seeds; a difference between two variants only means something
next to the spread over seeds. The default test is Welch's two-sided t-test (unequal variances): the seeds of two
variants are independent initialisations (parameter shapes differ between variants, so the same `--seed` draws
different weights), and Welch's assumes nothing about pairing or equal spread. Where two variants share seeds a
paired t-test over the common seeds is offered as well (`test="paired"`): it is the right one when a seed couples
the runs (same data order and split through `--seed` / `--data_seed`), and it is never the silent default.

Where a number cannot be computed honestly (one seed, no variance) it is `None` with the reason, never a stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean, stdev

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 0.05
DEFAULT_TEST = "welch"
TESTS = ("welch", "paired")
TEST_NAMES = {"welch": "Welch's two-sided t-test (unequal variances)", "paired": "paired two-sided t-test"}


@dataclass(frozen=True)
class Summary:
    """One cell's metric over its seeds; `ci_low`/`ci_high` are None (with `note`) where the CI is undefined."""

    n: int
    mean: float | None
    std: float | None  # sample standard deviation (ddof=1)
    ci_low: float | None
    ci_high: float | None
    note: str | None = None  # why std or the CI is missing, or which values were left out

    @property
    def ci_half_width(self) -> float | None:
        return None if self.ci_high is None or self.mean is None else self.ci_high - self.mean


@dataclass(frozen=True)
class Comparison:
    """`values` against `baseline_values`: `diff` = mean(values) - mean(baseline) (for `paired`: the mean of the
    per-seed differences over the common seeds); `p_value` None with `reason` where the test is undefined."""

    test: str
    diff: float | None
    p_value: float | None
    statistic: float | None = None
    df: float | None = None
    n_baseline: int = 0
    n: int = 0  # for paired: the number of pairs
    reason: str | None = None

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p_value is not None and self.p_value < alpha


def _finite(values: Sequence[float]) -> tuple[list[float], int]:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return kept, len(values) - len(kept)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student-t interval of the mean: mean ± t_{(1+c)/2, n-1} · s / √n; None below two values."""
    if len(values) < 2:
        return None
    centre, spread = mean(values), stdev(values)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, len(values) - 1)) * spread / math.sqrt(len(values))
    return centre - half, centre + half


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, std (ddof=1) and the Student-t CI of one cell's seeds. Non-finite values (a diverged run's NaN loss)
    are left out and counted in `note`: they would turn every statistic into NaN."""
    kept, dropped = _finite(values)
    notes = [f"{dropped} non-finite value(s) left out"] if dropped else []
    if not kept:
        return Summary(0, None, None, None, None, "; ".join(notes + ["no results"]))
    if len(kept) == 1:
        notes.append("n=1: std and CI undefined")
        return Summary(1, kept[0], None, None, None, "; ".join(notes))
    low, high = t_interval(kept, confidence)
    return Summary(len(kept), mean(kept), stdev(kept), low, high, "; ".join(notes) or None)


def welch(baseline_values: Sequence[float], values: Sequence[float]) -> Comparison:
    """Welch's t-test of `values` against the baseline (scipy's `ttest_ind(equal_var=False)`)."""
    base, other = _finite(baseline_values)[0], _finite(values)[0]
    diff = mean(other) - mean(base) if base and other else None
    result = {"test": "welch", "diff": diff, "n_baseline": len(base), "n": len(other)}
    if len(base) < 2 or len(other) < 2:
        short = " and ".join(f"{name} n={len(v)}" for name, v in (("baseline", base), ("variant", other))
                             if len(v) < 2)
        return Comparison(**result, p_value=None, reason=f"n<2 ({short}): Welch's test needs 2 seeds on each side")
    if stdev(base) == 0 and stdev(other) == 0:
        return Comparison(**result, p_value=None, reason="zero variance in both: the t statistic is undefined")
    test = scipy_stats.ttest_ind(other, base, equal_var=False)
    return Comparison(**result, p_value=float(test.pvalue), statistic=float(test.statistic), df=float(test.df))


def paired(baseline_values: Sequence[float], values: Sequence[float], baseline_seeds: Sequence[int],
           seeds: Sequence[int]) -> Comparison:
    """Paired t-test (scipy's `ttest_rel`) over the seeds both variants have; a seed in one only is left out."""
    base = {s: float(v) for s, v in zip(baseline_seeds, baseline_values, strict=True) if math.isfinite(float(v))}
    other = {s: float(v) for s, v in zip(seeds, values, strict=True) if math.isfinite(float(v))}
    common = [s for s in other if s in base]
    differences = [other[s] - base[s] for s in common]
    result = {"test": "paired", "diff": mean(differences) if differences else None, "n_baseline": len(common),
              "n": len(common)}
    if len(common) < 2:
        return Comparison(**result, p_value=None, reason=f"{len(common)} common seed(s): a paired test needs 2")
    if stdev(differences) == 0:
        return Comparison(**result, p_value=None,
                          reason="the per-seed differences have zero variance: the t statistic is undefined")
    test = scipy_stats.ttest_rel([other[s] for s in common], [base[s] for s in common])
    return Comparison(**result, p_value=float(test.pvalue), statistic=float(test.statistic), df=float(test.df))


def compare(baseline_values: Sequence[float], values: Sequence[float], test: str = DEFAULT_TEST,
            baseline_seeds: Sequence[int] | None = None, seeds: Sequence[int] | None = None) -> Comparison:
    """Difference of means and its p-value: Welch's by default; `test="paired"` pairs values by seed (seeds needed)."""
    if test == "welch":
        return welch(baseline_values, values)
    if test == "paired":
        if baseline_seeds is None or seeds is None:
            raise ValueError("the paired test pairs values by seed: pass baseline_seeds and seeds")
        return paired(baseline_values, values, baseline_seeds, seeds)
    raise ValueError(f"test {test!r}: choose from {', '.join(TESTS)}")
