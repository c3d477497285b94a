"""Re-sign progress on pages that other views render: the incident page, the dashboard.

Inclusion tags, so those views need no change: each tag runs its own (scoped) queries.
"""

from __future__ import annotations

from typing import Any

from django import template

from keys import resigning
from keys.models import Incident

register = template.Library()


@register.inclusion_tag("keys/_resign_progress.html")
def incident_resign_progress(incident: Incident) -> dict[str, Any]:
    """Each of the incident's batches: pending approval (with its link), n of N, failures."""
    batches = incident.resign_batches.select_related("old_key", "new_key").order_by("created_at")
    return {"rows": [resigning.progress(b) for b in batches]}


@register.inclusion_tag("approvals/_resign_batches.html", takes_context=True)
def pending_resign_batches(context: template.Context) -> dict[str, Any]:
    """The re-sign batches waiting for this approver's authorities (deny by default)."""
    return {"batches": list(resigning.pending_for(context["user"])[:50])}
