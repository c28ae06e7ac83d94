"""The assessor's kit (PCI DSS v4.0.1): `tessera pci evidence --out DIR`.

It gathers, from the running stack and the repository, the evidence behind every control that
`docs/pci/controls.yaml` claims, and judges each one pass, fail or "not checked" (with the
reason, never shown as a pass). It reads; it changes nothing: database sessions are read-only,
HTTP calls are GETs or the vault's read-only admin lookups, and no card number ever leaves the
vault through it (what a scan finds is reported masked).
"""
