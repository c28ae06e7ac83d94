"""semgrep --test fixture for tessera-secret-compared-with-eq."""

import hmac


def check_token(given_token: str, expected_token: str) -> bool:
    # ruleid: tessera-secret-compared-with-eq
    return given_token == expected_token


def check_signature(header: str, signature: str) -> bool:
    # ruleid: tessera-secret-compared-with-eq
    return header != signature


def check_password(row: dict[str, str], attempt: str) -> bool:
    # ruleid: tessera-secret-compared-with-eq
    return row["password_hash"] == attempt


def check_token_safely(given_token: str, expected_token: str) -> bool:
    # ok: tessera-secret-compared-with-eq
    return hmac.compare_digest(given_token, expected_token)


def shapes(token: str | None, token_type: str, secrets_count: int) -> bool:
    # ok: tessera-secret-compared-with-eq
    a = token is None or token == ""
    # ok: tessera-secret-compared-with-eq
    b = token_type == "bearer"
    # ok: tessera-secret-compared-with-eq
    c = secrets_count == 2
    # ok: tessera-secret-compared-with-eq
    d = len(token or "") == 32
    return a and b and c and d
