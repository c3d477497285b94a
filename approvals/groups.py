"""Per-authority groups: ``approvers:<authority>`` and ``custodians:<authority>``."""

from __future__ import annotations

from typing import Any

APPROVERS = "approvers:"
CUSTODIANS = "custodians:"


def approver_group(authority: str) -> str:
    return f"{APPROVERS}{authority}"


def custodian_group(authority: str) -> str:
    return f"{CUSTODIANS}{authority}"


def approver_authorities(user: Any) -> list[str]:
    """The authorities ``user`` may approve for (empty for anonymous users and outsiders)."""
    if not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return []
    names = user.groups.filter(name__startswith=APPROVERS).values_list("name", flat=True)
    return sorted(name[len(APPROVERS) :] for name in names)


def identity_of(user: Any) -> str:
    return user.email or user.username
