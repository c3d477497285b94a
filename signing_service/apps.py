from django.apps import AppConfig
from django.core.exceptions import ImproperlyConfigured


class SigningServiceConfig(AppConfig):
    name = "signing_service"
    verbose_name = "Model signing"

    def ready(self) -> None:
        from django.core.signals import setting_changed

        from signing_service import lookups  # noqa: F401 (registers field__any)
        from signing_service.oidc_config import OidcConfigError, current_oidc_config
        from signing_service.policy import PolicyError, current_policy

        # An invalid policy must stop the service at start-up, not at the first request.
        try:
            current_policy()
        except PolicyError as exc:
            raise ImproperlyConfigured(f"signing policy is invalid: {exc}") from None
        try:
            current_oidc_config()
        except OidcConfigError as exc:
            raise ImproperlyConfigured(f"OIDC_CONFIG_FILE is invalid: {exc}") from None
        setting_changed.connect(_reset_policy)


def _reset_policy(*, setting: str, **kwargs: object) -> None:
    if setting == "SIGNING_POLICY_FILE":
        from signing_service.policy import current_policy

        current_policy.cache_clear()
    if setting in ("SIGNING_POLICY_FILE", "OIDC_CONFIG_FILE"):
        from signing_service import oidc
        from signing_service.oidc_config import current_oidc_config

        current_oidc_config.cache_clear()  # it names the policy's authorities
        oidc.reset()
