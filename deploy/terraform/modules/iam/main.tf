locals {
  # GSA -> the one Kubernetes service account (namespace/name) that may act as it. deploy/k8s
  # annotates exactly these KSAs with iam.gke.io/gcp-service-account.
  workloads = {
    tessera-vault         = { namespace = "tessera-cde", ksa = "tessera-vault", what = "the vault (runtime role of tessera_vault)" }
    tessera-vault-migrate = { namespace = "tessera-cde", ksa = "tessera-vault-migrate", what = "the vault's migration Job (owner of tessera_vault)" }
    tessera-api           = { namespace = "tessera-app", ksa = "tessera-api", what = "the payment API (runtime role of tessera_api)" }
    tessera-worker        = { namespace = "tessera-app", ksa = "tessera-worker", what = "the worker (runtime role of tessera_api)" }
    tessera-api-migrate   = { namespace = "tessera-app", ksa = "tessera-api-migrate", what = "the API's migration Job (owner of tessera_api)" }
    tessera-admin         = { namespace = "tessera-admin", ksa = "tessera-admin", what = "the admin tooling that calls the vault's admin port and writes the API database (merchants)" }
    # The edge gateway's pods mount their TLS certificate and key from Secret Manager through
    # the CSI driver, which fetches with the pod's Workload Identity: it needs a GSA of its own.
    tessera-edge = { namespace = "tessera-edge", ksa = "tessera-ingressgateway", what = "the edge gateway (reads its TLS certificate and key, nothing else)" }
  }

  # What GKE nodes need and nothing more (Google's least-privilege node service account).
  node_roles = [
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
    "roles/autoscaling.metricsWriter",
    "roles/artifactregistry.reader",
  ]
}

resource "google_service_account" "workload" {
  for_each     = local.workloads
  project      = var.project_id
  account_id   = each.key
  display_name = each.key
  description  = "Workload Identity of ${each.value.what}: ${each.value.namespace}/${each.value.ksa}."
}

resource "google_service_account_iam_member" "workload_identity" {
  for_each           = local.workloads
  service_account_id = google_service_account.workload[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.workload_pool}[${each.value.namespace}/${each.value.ksa}]"
}

resource "google_service_account" "nodes" {
  project      = var.project_id
  account_id   = "tessera-gke-nodes"
  display_name = "tessera-gke-nodes"
  description  = "GKE nodes: logs, metrics and image pulls only; workloads use Workload Identity."
}

resource "google_project_iam_member" "nodes" {
  for_each = toset(local.node_roles)
  project  = var.project_id
  role     = each.value
  member   = "serviceAccount:${google_service_account.nodes.email}"
}
