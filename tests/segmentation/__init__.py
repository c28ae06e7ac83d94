"""Network segmentation, tested (PCI DSS 11.4.5): `deploy/flows.yaml` rendered into nftables
rules between Linux network namespaces, the real services run inside them, and a probe matrix
checks every (source, destination, port) against the file. `make segmentation` runs it."""
