"""How long the service really keeps files: what dead links tell (pure).

The docs say 3 days in one place and 24 hours in another, and nothing promises that
a link lives until its stated expiry. When `verify` finds links dead before their
`expires_at`, these numbers say how early, and whether `refresh_within` leaves
enough room. The ledger keeps the latest finding as a fact, which `status` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migrator.model import HOUR
from migrator.units import format_duration, number_or_none

DEATHS_FACT = "link_deaths"  # the ledger fact: what the last verify learnt of lifetimes


@dataclass(frozen=True, slots=True)
class Deaths:
    """Links found dead before their stated expiry: how many, how early (seconds)."""

    count: int = 0
    soonest_after_upload: float | None = None  # the shortest upload -> found-dead time
    most_before_expiry: float | None = None  # the longest found-dead -> expiry time

    def add(self, uploaded_at: float, found_at: float, expires_at: float) -> Deaths:
        early = expires_at - found_at
        if early <= 0:
            return self  # died when it said it would
        age = found_at - uploaded_at
        return Deaths(
            self.count + 1,
            age if self.soonest_after_upload is None else min(age, self.soonest_after_upload),
            early if self.most_before_expiry is None else max(early, self.most_before_expiry),
        )

    def note(self, refresh_within: float) -> str | None:
        """One line for the operator, or None when no link died early (pure)."""
        if not self.count or self.most_before_expiry is None:
            return None
        age = format_duration(self.soonest_after_upload)
        early = format_duration(self.most_before_expiry)
        text = (
            f"{self.count} links died before their stated expiry: found dead as soon as "
            f"{age} after upload, up to {early} before expires_at"
        )
        if self.most_before_expiry >= refresh_within:
            hours = self.most_before_expiry / HOUR
            text += (
                f"; refresh_within {format_duration(refresh_within)} is too late: set it above "
                f"{hours:.0f}h plus the refresh interval"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "soonest_after_upload": self.soonest_after_upload,
            "most_before_expiry": self.most_before_expiry,
        }

    @classmethod
    def from_dict(cls, value: object) -> Deaths:
        if not isinstance(value, dict):
            return cls()
        return cls(
            int(value.get("count") or 0),
            number_or_none(value.get("soonest_after_upload")),
            number_or_none(value.get("most_before_expiry")),
        )
