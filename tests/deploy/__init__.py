"""`make deploy-check`: the deployment tree (deploy/) validated offline with real tools.

`python -m tests.deploy` runs every step and exits 1 if any failed. The Kubernetes steps live
in `k8s.py`, the Terraform steps in `terraform.py`; the shared runner is in `tools.py`.
"""
