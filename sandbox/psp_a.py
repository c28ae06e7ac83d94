"""PSP A: the first payment processor simulator (dev and test infrastructure, never deployed).

This foundation serves its health check so the local stack, compose and the load tests can
start it; its payment protocol (authorize, capture, void, refund, inquiry) arrives with the
payment API issue.
"""

from __future__ import annotations

import os

from litestar import Litestar, get


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def create_app() -> Litestar:
    return Litestar(route_handlers=[healthz], logging_config=None)


def main() -> None:
    import uvicorn

    uvicorn.run(
        create_app(),
        host=os.environ.get("TESSERA_PSP_A_HOST", "127.0.0.1"),
        port=int(os.environ.get("TESSERA_PSP_A_PORT", "8201")),
        loop="uvloop",
        log_level="warning",
    )


if __name__ == "__main__":
    main()
