from typing import Any

from django.http import HttpRequest

from keys.ceremonies import custodian_authorities


def roles(request: HttpRequest) -> dict[str, Any]:
    """Lazily: only pages that show the navigation pay for the group lookup."""
    return {"is_custodian": lambda: bool(custodian_authorities(request.user))}
