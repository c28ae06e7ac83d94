locals {
  sql_vault   = "${var.project_id}:tessera-vault"
  data_access = "projects/${var.project_id}/logs/cloudaudit.googleapis.com%2Fdata_access"

  buckets = {
    # Who did what to card data and keys: pgaudit of the vault's database, Cloud KMS and Secret
    # Manager data access, and the Kubernetes API's audit of the tessera-cde namespace.
    tessera-vault-audit = {
      description = "Tessera vault audit trail (pgaudit, KMS and secret access, tessera-cde API audit)"
      filter      = <<-EOT
        (resource.type="cloudsql_database" AND resource.labels.database_id="${local.sql_vault}" AND logName="${local.data_access}" AND protoPayload.request.@type="type.googleapis.com/google.cloud.sql.audit.v1.PgAuditEntry")
        OR (resource.type="cloudkms_cryptokey" AND resource.labels.key_ring_id="tessera")
        OR (protoPayload.serviceName="secretmanager.googleapis.com" AND (protoPayload.resourceName:"secrets/tessera-vault-" OR protoPayload.resourceName:"secrets/tessera-edge-tls-"))
        OR (resource.type="k8s_cluster" AND resource.labels.cluster_name="tessera" AND protoPayload.resourceName:"namespaces/tessera-cde")
      EOT
    }
    # What reached the vault and how: its containers' logs (request and audit events), its
    # database's connection log, and the edge gateway's access log (browsers reach the vault's
    # public port only through it; its load balancer is a passthrough one, which logs nothing).
    tessera-vault-access = {
      description = "Tessera vault access logs (tessera-cde containers, tessera-vault connections, edge gateway)"
      filter      = <<-EOT
        (resource.type="k8s_container" AND resource.labels.cluster_name="tessera" AND resource.labels.namespace_name="tessera-cde")
        OR (resource.type="cloudsql_database" AND resource.labels.database_id="${local.sql_vault}" AND logName="projects/${var.project_id}/logs/cloudsql.googleapis.com%2Fpostgres.log")
        OR (resource.type="k8s_container" AND resource.labels.cluster_name="tessera" AND resource.labels.namespace_name="tessera-edge")
      EOT
    }
  }
}

resource "google_logging_project_bucket_config" "vault" {
  for_each       = local.buckets
  project        = var.project_id
  location       = var.region
  bucket_id      = each.key
  description    = each.value.description
  retention_days = var.retention_days
  locked         = var.locked

  cmek_settings {
    kms_key_name = var.kms_key_name
  }
}

resource "google_logging_project_sink" "vault" {
  for_each               = local.buckets
  project                = var.project_id
  name                   = each.key
  description            = each.value.description
  destination            = "logging.googleapis.com/${google_logging_project_bucket_config.vault[each.key].id}"
  filter                 = trimspace(each.value.filter)
  unique_writer_identity = true
}

resource "google_project_iam_member" "sink_writer" {
  for_each = local.buckets
  project  = var.project_id
  role     = "roles/logging.bucketWriter"
  member   = google_logging_project_sink.vault[each.key].writer_identity

  condition {
    title      = "only-${each.key}"
    expression = "resource.name.endsWith('locations/${var.region}/buckets/${each.key}')"
  }
}

# Cloud Audit Logs data access (off by default): every Encrypt/Decrypt on the KEK, every secret
# read, every Cloud SQL admin read, with the caller's identity.
resource "google_project_iam_audit_config" "data_access" {
  for_each = toset(["cloudkms.googleapis.com", "secretmanager.googleapis.com", "sqladmin.googleapis.com"])
  project  = var.project_id
  service  = each.value

  audit_log_config {
    log_type = "ADMIN_READ"
  }
  audit_log_config {
    log_type = "DATA_READ"
  }
  audit_log_config {
    log_type = "DATA_WRITE"
  }
}
