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
  # What tessera-api and tessera-vault do not share; the resources below state the rest once.
  # Their tiers, module variables, sit in local.tiers: checkov expands a for_each only over
  # values it can resolve.
  instances = {
    api = {
      database          = "tessera_api"
      backup_start_time = "02:00"
      maintenance_hour  = 3
      pci_scope         = "connected"
      # The API's database holds no card data: role and schema changes are enough.
      pgaudit_flags = [
        { name = "pgaudit.log", value = "ddl,role" },
      ]
    }
    vault = {
      database          = "tessera_vault"
      backup_start_time = "02:30"
      maintenance_hour  = 4
      pci_scope         = "cde"
      # PCI DSS 10.2: every statement against the CDE's database, by whom (pgaudit session
      # audit). Parameters stay out of the log: they carry tokens and ciphertext.
      pgaudit_flags = [
        { name = "pgaudit.log", value = "all" },
        { name = "pgaudit.log_parameter", value = "off" },
        { name = "pgaudit.log_relation", value = "on" },
      ]
    }
  }
  tiers = {
    api   = var.api_tier
    vault = var.vault_tier
  }
  # The connect and log-in roles, each limited by an IAM condition to the one instance.
  instance_roles = merge([
    for key, user in local.iam_users : {
      for role in ["roles/cloudsql.client", "roles/cloudsql.instanceUser"] :
      "${key}/${role}" => merge(user, { role = role })
    }
  ]...)
}

resource "google_sql_database_instance" "this" {
  # checkov:skip=CKV_GCP_79: Tessera is built and tested on PostgreSQL 15 (CI, make run, the migrations); a major upgrade is its own change.
  # checkov:skip=CKV2_GCP_13: log_duration writes a line for every statement (thousands per second at peak) with no statement or user; pgaudit and Query Insights carry what review needs.
  for_each            = local.instances
  project             = var.project_id
  name                = "tessera-${each.key}"
  region              = var.region
  database_version    = "POSTGRES_15"
  encryption_key_name = var.kms_key_name
  deletion_protection = true

  settings {
    tier                        = local.tiers[each.key]
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
      start_time                     = each.value.backup_start_time
      transaction_log_retention_days = 7

      backup_retention_settings {
        retained_backups = 30
        retention_unit   = "COUNT"
      }
    }

    maintenance_window {
      day          = 7
      hour         = each.value.maintenance_hour
      update_track = "stable"
    }

    insights_config {
      query_insights_enabled  = true
      record_application_tags = false
      record_client_address   = false
    }

    # Static blocks but for the pgaudit ones: checkov reads no dynamic block below the top
    # level, and these are what its PostgreSQL logging checks look for. A dynamic block stands
    # where it is written, so every instance keeps this order of flags.
    database_flags {
      name  = "cloudsql.iam_authentication"
      value = "on"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    dynamic "database_flags" {
      for_each = each.value.pgaudit_flags
      content {
        name  = database_flags.value.name
        value = database_flags.value.value
      }
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
      pci-scope = each.value.pci_scope
    }
  }

  depends_on = [var.private_services_connection]
}

resource "google_sql_database" "this" {
  for_each = local.instances
  project  = var.project_id
  name     = each.value.database
  instance = google_sql_database_instance.this[each.key].name
}

# The instances and databases were one resource each before; these keep an existing state's
# (and its data's) addresses, so that Terraform moves them instead of replacing them.
moved {
  from = google_sql_database_instance.api
  to   = google_sql_database_instance.this["api"]
}

moved {
  from = google_sql_database_instance.vault
  to   = google_sql_database_instance.this["vault"]
}

moved {
  from = google_sql_database.api
  to   = google_sql_database.this["api"]
}

moved {
  from = google_sql_database.vault
  to   = google_sql_database.this["vault"]
}

# IAM database users: Postgres role "GSA@PROJECT.iam", password-less (IAM authentication).
resource "google_sql_user" "iam" {
  for_each = local.iam_users
  project  = var.project_id
  instance = google_sql_database_instance.this[each.value.instance].name
  name     = trimsuffix(var.service_account_emails[each.value.gsa], ".gserviceaccount.com")
  type     = "CLOUD_IAM_SERVICE_ACCOUNT"
}

resource "google_project_iam_member" "instance_access" {
  for_each = local.instance_roles
  project  = var.project_id
  role     = each.value.role
  member   = "serviceAccount:${var.service_account_emails[each.value.gsa]}"

  condition {
    title       = "only-${google_sql_database_instance.this[each.value.instance].name}"
    description = "Limits ${each.value.role} to the ${each.value.instance} instance."
    expression  = "resource.name == 'projects/${var.project_id}/instances/${google_sql_database_instance.this[each.value.instance].name}' && resource.type == 'sqladmin.googleapis.com/Instance'"
  }
}
