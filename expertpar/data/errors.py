"""Per-sample data errors: the reasons a sample is skipped instead of trained on."""
from __future__ import annotations

from dataclasses import dataclass, field

# Every reason a sample can be skipped for; metrics report each of them (0 if unseen)
# so dashboards get stable keys from the first step.
# New reasons go last: an index on disk stores a skip's reason by its position here.
SKIP_REASONS: tuple[str, ...] = ("corrupt_image", "empty_caption", "missing_caption",
                                 "missing_image", "caption_too_long", "duplicate_key",
                                 "outside_manifest_dir")


class SampleError(ValueError):
    """A single sample is unusable; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown sample error reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep picklable across processes (Ray workers, multiprocessing)
        return (type(self), (self.reason, str(self)))


@dataclass
class SkipStats:
    """Counts of skipped samples by reason."""

    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def as_metrics(self, prefix: str = "data/skipped/") -> dict[str, int]:
        """`{prefix}{reason}` for every known reason (0 if none) plus `{prefix}total`."""
        metrics = {f"{prefix}{reason}": self.counts.get(reason, 0) for reason in SKIP_REASONS}
        metrics.update({f"{prefix}{reason}": n for reason, n in self.counts.items()})
        metrics[f"{prefix}total"] = self.total
        return metrics
