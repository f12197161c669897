"""Identity and access: people (password + TOTP → JWT), machines (API keys), their roles,
the signing keys of tokens, and the access review.

``AuthService`` is the one object callers hold; each concern lives in its own module:
``auth.people`` (people and enrolment), ``auth.login``, ``auth.api_keys``, ``auth.jwt_keys`` (tokens
and their signing keys), ``auth.review`` (access review), over ``auth.core`` (what they
share). The master-key protocol and the registry of sealed secrets are ``auth.master_key``.
"""

from __future__ import annotations

from auth.api_keys import ApiKeysMixin
from auth.core import CURRENT, RETIRED
from auth.errors import AuthError
from auth.login import LoginMixin, LoginResult
from auth.master_key import (
    claim_master_key,
    master_key_is_current,
    record_master_key,
    replace_master_key,
)
from auth.review import AccessReviewMixin

__all__ = [
    "CURRENT",
    "RETIRED",
    "AuthError",
    "AuthService",
    "LoginResult",
    "claim_master_key",
    "master_key_is_current",
    "record_master_key",
    "replace_master_key",
]


class AuthService(LoginMixin, ApiKeysMixin, AccessReviewMixin):
    """All identity operations over one database; ``clock`` returns Unix seconds."""
