locals {
  policy = "accessPolicies/${var.access_policy_id}"
  perimeter = {
    resources           = ["projects/${var.project_number}"]
    restricted_services = var.restricted_services
    access_levels       = [google_access_context_manager_access_level.admins.name]
  }
}

# Who may reach the restricted APIs from outside the perimeter: administrators and CI, by identity
# and network origin together.
resource "google_access_context_manager_access_level" "admins" {
  parent = local.policy
  name   = "${local.policy}/accessLevels/tessera_admins"
  title  = "tessera_admins"

  basic {
    combining_function = "AND"

    conditions {
      members = var.admin_members
    }

    conditions {
      ip_subnetworks = var.admin_ip_ranges
    }
  }
}

resource "google_access_context_manager_service_perimeter" "tessera" {
  parent         = local.policy
  name           = "${local.policy}/servicePerimeters/tessera"
  title          = "tessera"
  description    = "Tessera's CDE: Cloud KMS (the vault's KEK), Cloud SQL and Secret Manager reachable only from inside the project's VPC or by the admin access level."
  perimeter_type = "PERIMETER_TYPE_REGULAR"

  use_explicit_dry_run_spec = var.dry_run

  dynamic "status" {
    for_each = var.dry_run ? [] : [local.perimeter]
    content {
      resources           = status.value.resources
      restricted_services = status.value.restricted_services
      access_levels       = status.value.access_levels

      # Workloads inside the VPC reach only the listed APIs (through restricted.googleapis.com).
      vpc_accessible_services {
        enable_restriction = true
        allowed_services   = var.vpc_allowed_services
      }
    }
  }

  dynamic "spec" {
    for_each = var.dry_run ? [local.perimeter] : []
    content {
      resources           = spec.value.resources
      restricted_services = spec.value.restricted_services
      access_levels       = spec.value.access_levels

      vpc_accessible_services {
        enable_restriction = true
        allowed_services   = var.vpc_allowed_services
      }
    }
  }
}
