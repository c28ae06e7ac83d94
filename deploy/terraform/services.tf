locals {
  apis = [
    "binaryauthorization.googleapis.com",
    "cloudkms.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "containeranalysis.googleapis.com",
    "dns.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "redis.googleapis.com",
    "secretmanager.googleapis.com",
    "servicenetworking.googleapis.com",
    "sqladmin.googleapis.com",
  ]
  project_number = data.google_project.this.number

  # Google's service agents that encrypt our data stores with our keys (CMEK). Built from the
  # project number (known at plan time) so they can key for_each; the identities below make
  # sure the lazily created ones exist before they are granted.
  service_agents = {
    cloudsql = "serviceAccount:service-${local.project_number}@gcp-sa-cloud-sql.iam.gserviceaccount.com"
    gke      = "serviceAccount:service-${local.project_number}@container-engine-robot.iam.gserviceaccount.com"
    compute  = "serviceAccount:service-${local.project_number}@compute-system.iam.gserviceaccount.com"
    redis    = "serviceAccount:service-${local.project_number}@cloud-redis.iam.gserviceaccount.com"
    secrets  = "serviceAccount:service-${local.project_number}@gcp-sa-secretmanager.iam.gserviceaccount.com" # pragma: allowlist secret
    logging  = "serviceAccount:${data.google_logging_project_cmek_settings.this.service_account_id}"
  }
}

data "google_project" "this" {
  project_id = var.project_id
}

data "google_logging_project_cmek_settings" "this" {
  project = var.project_id
}

resource "google_project_service" "apis" {
  for_each           = toset(local.apis)
  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

resource "google_project_service_identity" "agents" {
  provider   = google-beta
  for_each   = toset(["sqladmin.googleapis.com", "redis.googleapis.com", "secretmanager.googleapis.com"])
  project    = var.project_id
  service    = each.value
  depends_on = [google_project_service.apis]
}
