resource "google_redis_instance" "api" {
  project        = var.project_id
  name           = "tessera-api"
  display_name   = "Tessera payment API: idempotency cache and circuit breakers"
  region         = var.region
  tier           = "STANDARD_HA"
  memory_size_gb = var.api_memory_size_gb
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
    maxmemory-policy = "volatile-lru"
  }

  persistence_config {
    persistence_mode = "DISABLED"
  }

  maintenance_policy {
    weekly_maintenance_window {
      day = "SUNDAY"
      start_time {
        hours   = 3
        minutes = 0
      }
    }
  }

  labels = {
    app       = "tessera"
    pci-scope = "connected"
  }

  depends_on = [var.private_services_connection]
}

# The vault's Redis holds CVCs (sensitive authentication data, PCI DSS 3.3) for minutes, sealed:
# never persisted to disk (no RDB/AOF), never evicted in favour of something else.
resource "google_redis_instance" "vault" {
  project        = var.project_id
  name           = "tessera-vault"
  display_name   = "Tessera vault: sealed CVCs until their one authorization"
  region         = var.region
  tier           = "STANDARD_HA"
  memory_size_gb = var.vault_memory_size_gb
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
    maxmemory-policy = "noeviction"
  }

  persistence_config {
    persistence_mode = "DISABLED"
  }

  maintenance_policy {
    weekly_maintenance_window {
      day = "SUNDAY"
      start_time {
        hours   = 4
        minutes = 0
      }
    }
  }

  labels = {
    app       = "tessera"
    pci-scope = "cde"
  }

  depends_on = [var.private_services_connection]
}
