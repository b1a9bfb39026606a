"""How continual learning is measured: the accuracy matrix and the numbers read from it.

R[i][j] is the score on task j's test split after training on tasks 0..i (T tasks, R is T x T).
b[j] is the score on task j of the model before any training (optional: forward transfer needs it).

  average accuracy   A_T   = 1/T sum_j R[T-1][j]                                  (Lopez-Paz & Ranzato 2017)
  backward transfer  BWT   = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])            (negative: forgetting)
  forward transfer   FWT   = 1/(T-1) sum_{j>0} (R[j-1][j] - b[j])                 (needs b)
  forgetting         f_j   = max_{l<T-1} R[l][j] - R[T-1][j] for j < T-1          (Chaudhry et al. 2018)
                     mean forgetting = 1/(T-1) sum_{j<T-1} f_j

With one task BWT, FWT and forgetting are undefined (None). Scores are fractions (accuracy 0..1).
"""

from __future__ import annotations


def _check(R: list[list[float]]) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"the accuracy matrix must be square and non-empty, got {[len(r) for r in R]} rows")
    return T


def average_accuracy(R: list[list[float]]) -> float:
    T = _check(R)
    return sum(R[T - 1]) / T


def backward_transfer(R: list[list[float]]) -> float | None:
    T = _check(R)
    if T < 2:
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(R: list[list[float]], base: list[float] | None) -> float | None:
    T = _check(R)
    if T < 2 or base is None:
        return None
    return sum(R[j - 1][j] - base[j] for j in range(1, T)) / (T - 1)


def forgetting(R: list[list[float]]) -> list[float | None]:
    """Per task: the best score it had before the last task minus its final score (None for the last task)."""
    T = _check(R)
    return [max(R[l][j] for l in range(T - 1)) - R[T - 1][j] if j < T - 1 else None for j in range(T)]


def summary(R: list[list[float]], names: list[str], base: list[float] | None = None) -> dict:
    """Everything above in one dict for summary.json."""
    per_task = forgetting(R)
    earlier = [f for f in per_task if f is not None]
    return {
        "tasks": list(names),
        "R": [list(row) for row in R],
        "base": list(base) if base is not None else None,
        "average_accuracy": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, base),
        "forgetting": dict(zip(names, per_task)),
        "mean_forgetting": sum(earlier) / len(earlier) if earlier else None,
    }


def table(R: list[list[float]], names: list[str], base: list[float] | None = None) -> str:
    """R as text: one row per 'after task i', one column per task; then A, BWT, FWT."""
    width = max(10, *(len(n) + 2 for n in names))
    corner = "after \\ on"
    lines = [f"{corner:<{width + 6}}" + "".join(f"{n:>{width}}" for n in names)]
    if base is not None:
        lines.append(f"{'(start)':<{width + 6}}" + "".join(f"{v:>{width}.4f}" for v in base))
    for i, row in enumerate(R):
        lines.append(f"{names[i]:<{width + 6}}" + "".join(f"{v:>{width}.4f}" for v in row))
    s = summary(R, names, base)
    fmt = (lambda v: "-" if v is None else f"{v:+.4f}")
    lines.append(f"average accuracy {s['average_accuracy']:.4f}   BWT {fmt(s['bwt'])}   FWT {fmt(s['fwt'])}   "
                 f"mean forgetting {fmt(s['mean_forgetting'])}")
    return "\n".join(lines)
