"""semgrep --test fixture for tessera-random-for-secret."""

import random
import secrets
import string


def new_api_key() -> str:
    # ruleid: tessera-random-for-secret
    return "".join(random.choice(string.ascii_letters) for _ in range(32))


def reset_link() -> str:
    # ruleid: tessera-random-for-secret
    session_token = str(random.getrandbits(128))
    return session_token


def make_nonce() -> bytes:
    rng = random.Random()
    # ruleid: tessera-random-for-secret
    return rng.randbytes(12)


def new_api_key_safely() -> str:
    # ok: tessera-random-for-secret
    return secrets.token_urlsafe(32)


def retry_delay(attempts: int, rng: random.Random) -> float:
    # ok: tessera-random-for-secret
    return float(2**attempts * rng.uniform(0.75, 1.25))


def sample_traffic() -> int:
    # ok: tessera-random-for-secret
    amount = random.randint(100, 5000)
    return amount
