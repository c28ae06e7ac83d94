output "hosts" {
  description = "Primary endpoint IP of each instance (api, vault)."
  value       = { for key, instance in google_redis_instance.this : key => instance.host }
}

output "ports" {
  description = "Port of each instance: 6378 with in-transit encryption."
  value       = { for key, instance in google_redis_instance.this : key => instance.port }
}

output "server_ca_certs" {
  description = "PEM CA certificate each instance's TLS certificate chains to (clients verify it)."
  sensitive   = true
  value       = { for key, instance in google_redis_instance.this : key => instance.server_ca_certs[0].cert }
}
