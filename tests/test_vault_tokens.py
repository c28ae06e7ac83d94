from __future__ import annotations

import httpx

from tests.conftest import VaultMerchant
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import bearer, card, tokenize, acting_for


def test_probe(vault: ServiceProcess, shop: VaultMerchant, other_shop: VaultMerchant, tokens: dict[str, str]) -> None:
    u = vault.url + "/v1/tokens"
    h = bearer(shop.publishable_key)
    def show(r: httpx.Response) -> None:
        print(r.request.method, r.status_code, dict(r.headers), r.text[:400])
    show(httpx.post(u, json=card(), headers=h))
    show(httpx.post(u, json=card(**{"4242424242424242": 1}), headers=h))
    show(httpx.post(u, json=card(color="red"), headers=h))
    show(httpx.post(u, json=card(exp_month=[1]), headers=h))
    show(httpx.post(u, json=card(number=4242424242424242), headers=h))
    show(httpx.post(u, json={"exp_month": 1, "exp_year": 2040}, headers=h))
    show(httpx.post(u, content=b'{"number": "4242424242424242", ', headers={**h, "content-type": "application/json"}))
    show(httpx.post(u, json=card(name="x" * 9000), headers=h))
    show(httpx.post(u, json=card(name="x" * 101), headers=h))
    show(httpx.post(u, json=card(), headers={**h, "origin": "https://shop.example"}))
    show(httpx.post(u, json=card(), headers={**h, "origin": "https://other.example"}))
    show(httpx.options(u, headers={"origin": "https://other.example", "access-control-request-method": "POST"}))
    show(httpx.options(u, headers={"origin": "https://nope.example", "access-control-request-method": "POST"}))
    show(httpx.options(u, headers={"access-control-request-method": "POST"}))
    t = tokenize(vault, shop)
    show(httpx.get(u + "/" + t["id"], headers=acting_for(tokens["service"], shop)))
    show(httpx.get(u + "/" + t["id"], headers=bearer(tokens["service"])))
    show(httpx.get(u + "/" + t["id"], headers={**bearer(tokens["service"]), "tessera-merchant": "bad"}))
    show(httpx.get(u + "/tok_123", headers=acting_for(tokens["service"], shop)))
    show(httpx.get(u + "/4242424242424242", headers=acting_for(tokens["service"], shop)))
    show(httpx.get(u + "/" + t["id"], headers=acting_for(tokens["service"], other_shop)))
    show(httpx.delete(u + "/" + t["id"], headers=acting_for(tokens["service"], shop)))
    show(httpx.delete(u + "/" + t["id"], headers=acting_for(tokens["service"], shop)))
    show(httpx.get(vault.url + "/schema/openapi.json"))
    print(vault.output()[-3000:])
