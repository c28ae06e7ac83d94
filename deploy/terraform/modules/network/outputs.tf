output "network_id" {
  description = "The VPC's id (projects/P/global/networks/tessera)."
  value       = google_compute_network.tessera.id
}

output "subnetwork_id" {
  description = "The nodes' subnet id."
  value       = google_compute_subnetwork.nodes.id
}

output "pods_range_name" {
  description = "Name of the Pods' secondary range."
  value       = "tessera-pods"
}

output "services_range_name" {
  description = "Name of the Services' secondary range."
  value       = "tessera-services"
}

output "private_services_range_name" {
  description = "Name of the private services access range (Cloud SQL, Memorystore)."
  value       = google_compute_global_address.private_services.name
}

output "private_services_connection" {
  description = "The service networking peering; Cloud SQL and Memorystore wait for it."
  value       = google_service_networking_connection.private_services.id
}

output "nat_ips" {
  description = "Cloud NAT's external addresses: what PSPs allowlist."
  value       = google_compute_address.nat[*].address
}

output "restricted_vip_cidr" {
  description = "restricted.googleapis.com's range."
  value       = local.restricted_vip_cidr
}
