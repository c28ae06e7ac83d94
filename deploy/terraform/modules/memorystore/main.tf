locals {
  # What the two instances do not share; the resource below states the rest once.
  instances = {
    api = {
      display_name     = "Tessera payment API: idempotency cache and circuit breakers"
      maxmemory_policy = "volatile-lru"
      maintenance_hour = 3
      pci_scope        = "connected"
    }
    # The vault's Redis holds CVCs (sensitive authentication data, PCI DSS 3.3) for minutes,
    # sealed: never persisted to disk (no RDB/AOF, below for both), never evicted in favour of
    # something else.
    vault = {
      display_name     = "Tessera vault: sealed CVCs until their one authorization"
      maxmemory_policy = "noeviction"
      maintenance_hour = 4
      pci_scope        = "cde"
    }
  }
  # Module variables, apart: checkov expands a for_each only over values it can resolve.
  memory_size_gb = {
    api   = var.api_memory_size_gb
    vault = var.vault_memory_size_gb
  }
}

resource "google_redis_instance" "this" {
  for_each       = local.instances
  project        = var.project_id
  name           = "tessera-${each.key}"
  display_name   = each.value.display_name
  region         = var.region
  tier           = "STANDARD_HA"
  memory_size_gb = local.memory_size_gb[each.key]
  redis_version  = "REDIS_7_2"
  # STANDARD_HA: a replica in another zone with automatic failover; nothing reads from it.
  read_replicas_mode = "READ_REPLICAS_DISABLED"

  authorized_network = var.network_id
  connect_mode       = "PRIVATE_SERVICE_ACCESS"
  reserved_ip_range  = var.private_services_range_name

  auth_enabled            = true
  transit_encryption_mode = "SERVER_AUTHENTICATION"
  customer_managed_key    = var.kms_key_name

  redis_configs = {
    maxmemory-policy = each.value.maxmemory_policy
  }

  persistence_config {
    persistence_mode = "DISABLED"
  }

  maintenance_policy {
    weekly_maintenance_window {
      day = "SUNDAY"
      start_time {
        hours   = each.value.maintenance_hour
        minutes = 0
      }
    }
  }

  labels = {
    app       = "tessera"
    pci-scope = each.value.pci_scope
  }

  depends_on = [var.private_services_connection]
}

# Each instance was a resource of its own before: Terraform moves it in an existing state
# instead of replacing it (and losing what it holds).
moved {
  from = google_redis_instance.api
  to   = google_redis_instance.this["api"]
}

moved {
  from = google_redis_instance.vault
  to   = google_redis_instance.this["vault"]
}
