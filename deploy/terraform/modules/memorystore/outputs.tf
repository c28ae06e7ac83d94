output "hosts" {
  description = "Primary endpoint IP of each instance (api, vault)."
  value = {
    api   = google_redis_instance.api.host
    vault = google_redis_instance.vault.host
  }
}

output "ports" {
  description = "Port of each instance: 6378 with in-transit encryption."
  value = {
    api   = google_redis_instance.api.port
    vault = google_redis_instance.vault.port
  }
}

output "server_ca_certs" {
  description = "PEM CA certificate each instance's TLS certificate chains to (clients verify it)."
  sensitive   = true
  value = {
    api   = google_redis_instance.api.server_ca_certs[0].cert
    vault = google_redis_instance.vault.server_ca_certs[0].cert
  }
}
