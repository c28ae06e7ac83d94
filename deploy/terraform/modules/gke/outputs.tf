output "cluster_name" {
  description = "The GKE cluster's name."
  value       = google_container_cluster.tessera.name
}

output "cluster_location" {
  description = "The cluster's region."
  value       = google_container_cluster.tessera.location
}

output "private_endpoint" {
  description = "The control plane's private IP (reachable from the authorized networks only)."
  value       = google_container_cluster.tessera.private_cluster_config[0].private_endpoint
}

output "workload_pool" {
  description = "The Workload Identity pool (PROJECT.svc.id.goog)."
  value       = google_container_cluster.tessera.workload_identity_config[0].workload_pool
}

output "attestor" {
  description = "The Binary Authorization attestor's full name (CI signs attestations for it)."
  value       = google_binary_authorization_attestor.release.id
}
