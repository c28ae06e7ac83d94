locals {
  # Which GSA logs in to which instance, and the Postgres role its IAM user is given. The
  # migrate GSAs act as the owner roles (they run the migrations); the others as the runtime
  # roles, which hold only what the migrations grant (tessera/dbsetup.py names the four roles).
  iam_users = {
    "api/tessera-api"         = { instance = "api", gsa = "tessera-api", pg_role = "tessera_api" }
    "api/tessera-worker"      = { instance = "api", gsa = "tessera-worker", pg_role = "tessera_api" }
    "api/tessera-api-migrate" = { instance = "api", gsa = "tessera-api-migrate", pg_role = "tessera_api_owner" }
    # The admin toolbox (`tessera merchants create|roll-key|configure`) writes merchants as the
    # API's runtime role, through its own Auth Proxy.
    "api/tessera-admin"           = { instance = "api", gsa = "tessera-admin", pg_role = "tessera_api" }
    "vault/tessera-vault"         = { instance = "vault", gsa = "tessera-vault", pg_role = "tessera_vault" }
    "vault/tessera-vault-migrate" = { instance = "vault", gsa = "tessera-vault-migrate", pg_role = "tessera_vault_owner" }
  }
  instances = {
    api   = google_sql_database_instance.api
    vault = google_sql_database_instance.vault
  }
  # The connect and log-in roles, each limited by an IAM condition to the one instance.
  instance_roles = merge([
    for key, user in local.iam_users : {
      for role in ["roles/cloudsql.client", "roles/cloudsql.instanceUser"] :
      "${key}/${role}" => merge(user, { role = role })
    }
  ]...)
}

resource "google_sql_database_instance" "api" {
  # checkov:skip=CKV_GCP_79: Tessera is built and tested on PostgreSQL 15 (CI, make run, the migrations); a major upgrade is its own change.
  # checkov:skip=CKV2_GCP_13: log_duration writes a line for every statement (thousands per second at peak) with no statement or user; pgaudit and Query Insights carry what review needs.
  project             = var.project_id
  name                = "tessera-api"
  region              = var.region
  database_version    = "POSTGRES_15"
  encryption_key_name = var.kms_key_name
  deletion_protection = true

  settings {
    tier                        = var.api_tier
    edition                     = "ENTERPRISE"
    availability_type           = "REGIONAL"
    disk_type                   = "PD_SSD"
    disk_autoresize             = true
    deletion_protection_enabled = true

    ip_configuration {
      ipv4_enabled       = false
      private_network    = var.network_id
      allocated_ip_range = var.private_services_range_name
      # Only the Cloud SQL Auth Proxy / connectors (client certificates they mint from IAM).
      ssl_mode = "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
      start_time                     = "02:00"
      transaction_log_retention_days = 7

      backup_retention_settings {
        retained_backups = 30
        retention_unit   = "COUNT"
      }
    }

    maintenance_window {
      day          = 7
      hour         = 3
      update_track = "stable"
    }

    insights_config {
      query_insights_enabled  = true
      record_application_tags = false
      record_client_address   = false
    }

    database_flags {
      name  = "cloudsql.iam_authentication"
      value = "on"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    # The API's database holds no card data: role and schema changes are enough.
    database_flags {
      name  = "pgaudit.log"
      value = "ddl,role"
    }
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    # ddl, not mod: mod would log bind parameters of every write.
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "log_executor_stats"
      value = "off"
    }
    database_flags {
      name  = "log_parser_stats"
      value = "off"
    }
    database_flags {
      name  = "log_planner_stats"
      value = "off"
    }
    database_flags {
      name  = "log_statement_stats"
      value = "off"
    }

    user_labels = {
      app       = "tessera"
      pci-scope = "connected"
    }
  }

  depends_on = [var.private_services_connection]
}

resource "google_sql_database_instance" "vault" {
  # checkov:skip=CKV_GCP_79: Tessera is built and tested on PostgreSQL 15 (CI, make run, the migrations); a major upgrade is its own change.
  # checkov:skip=CKV2_GCP_13: log_duration writes a line for every statement (thousands per second at peak) with no statement or user; pgaudit and Query Insights carry what review needs.
  project             = var.project_id
  name                = "tessera-vault"
  region              = var.region
  database_version    = "POSTGRES_15"
  encryption_key_name = var.kms_key_name
  deletion_protection = true

  settings {
    tier                        = var.vault_tier
    edition                     = "ENTERPRISE"
    availability_type           = "REGIONAL"
    disk_type                   = "PD_SSD"
    disk_autoresize             = true
    deletion_protection_enabled = true

    ip_configuration {
      ipv4_enabled       = false
      private_network    = var.network_id
      allocated_ip_range = var.private_services_range_name
      ssl_mode           = "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
      start_time                     = "02:30"
      transaction_log_retention_days = 7

      backup_retention_settings {
        retained_backups = 30
        retention_unit   = "COUNT"
      }
    }

    maintenance_window {
      day          = 7
      hour         = 4
      update_track = "stable"
    }

    insights_config {
      query_insights_enabled  = true
      record_application_tags = false
      record_client_address   = false
    }

    database_flags {
      name  = "cloudsql.iam_authentication"
      value = "on"
    }
    # PCI DSS 10.2: every statement against the CDE's database, by whom (pgaudit session audit).
    # Parameters stay out of the log: they carry tokens and ciphertext.
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    database_flags {
      name  = "pgaudit.log"
      value = "all"
    }
    database_flags {
      name  = "pgaudit.log_parameter"
      value = "off"
    }
    database_flags {
      name  = "pgaudit.log_relation"
      value = "on"
    }
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "log_executor_stats"
      value = "off"
    }
    database_flags {
      name  = "log_parser_stats"
      value = "off"
    }
    database_flags {
      name  = "log_planner_stats"
      value = "off"
    }
    database_flags {
      name  = "log_statement_stats"
      value = "off"
    }

    user_labels = {
      app       = "tessera"
      pci-scope = "cde"
    }
  }

  depends_on = [var.private_services_connection]
}

resource "google_sql_database" "api" {
  project  = var.project_id
  name     = "tessera_api"
  instance = google_sql_database_instance.api.name
}

resource "google_sql_database" "vault" {
  project  = var.project_id
  name     = "tessera_vault"
  instance = google_sql_database_instance.vault.name
}

# IAM database users: Postgres role "GSA@PROJECT.iam", password-less (IAM authentication).
resource "google_sql_user" "iam" {
  for_each = local.iam_users
  project  = var.project_id
  instance = local.instances[each.value.instance].name
  name     = trimsuffix(var.service_account_emails[each.value.gsa], ".gserviceaccount.com")
  type     = "CLOUD_IAM_SERVICE_ACCOUNT"
}

resource "google_project_iam_member" "instance_access" {
  for_each = local.instance_roles
  project  = var.project_id
  role     = each.value.role
  member   = "serviceAccount:${var.service_account_emails[each.value.gsa]}"

  condition {
    title       = "only-${local.instances[each.value.instance].name}"
    description = "Limits ${each.value.role} to the ${each.value.instance} instance."
    expression  = "resource.name == 'projects/${var.project_id}/instances/${local.instances[each.value.instance].name}' && resource.type == 'sqladmin.googleapis.com/Instance'"
  }
}
