"""Per-sample data errors: the reasons a sample is skipped instead of trained on."""
from __future__ import annotations

# Every reason a sample can be skipped for; metrics report each of them (0 if unseen)
# so dashboards get stable keys from the first step.
SKIP_REASONS: tuple[str, ...] = ("corrupt_image", "empty_caption", "missing_caption", "missing_image")


class SampleError(ValueError):
    """A single sample is unusable; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown sample error reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep picklable across processes (Ray workers, multiprocessing)
        return (type(self), (self.reason, str(self)))
