output "project_number" {
  description = "The project's number: input of org/ (the VPC Service Controls perimeter)."
  value       = data.google_project.this.number
}

output "vault_kms_key_name" {
  description = "The vault's KEK, projects/P/locations/L/keyRings/tessera/cryptoKeys/tessera-vault-kek: TESSERA_VAULT_GCP_KMS_KEY_NAME."
  value       = module.kms.vault_kek_name
}

output "kms_cmek_key_names" {
  description = "The CMEK keys, by data store (cloudsql, gke-etcd, disks, logs, secrets, redis)."
  value       = module.kms.cmek_key_names
}

output "cloudsql_connection_names" {
  description = "PROJECT:REGION:INSTANCE of tessera-api and tessera-vault: the Cloud SQL Auth Proxy's instance arguments."
  value       = module.cloudsql.connection_names
}

output "cloudsql_private_ips" {
  description = "Private IPs of the two instances (inside private_services_cidr)."
  value       = module.cloudsql.private_ips
}

output "cloudsql_iam_users" {
  description = "IAM database user of each GSA and the Postgres role it is granted (TESSERA_*_DATABASE_URL user names)."
  value       = module.cloudsql.iam_users
}

output "redis_hosts" {
  description = "Memorystore primary endpoints (api, vault): TESSERA_API_REDIS_URL / TESSERA_VAULT_REDIS_URL hosts."
  value       = module.memorystore.hosts
}

output "redis_ports" {
  description = "Memorystore ports (6378: TLS, rediss://)."
  value       = module.memorystore.ports
}

output "redis_server_ca_certs" {
  description = "PEM CA certificates the Redis clients verify (api, vault)."
  value       = module.memorystore.server_ca_certs
  sensitive   = true
}

output "service_account_emails" {
  description = "GSA e-mail by name; deploy/k8s annotates each Kubernetes service account with its own."
  value       = module.iam.emails
}

output "workload_identity_members" {
  description = "GSA -> serviceAccount:PROJECT.svc.id.goog[NAMESPACE/KSA] allowed to act as it."
  value       = module.iam.workload_identity_members
}

output "secret_ids" {
  description = "Secret Manager containers (values are added by an operator), by secret id."
  value       = module.secrets.secret_ids
}

output "gke_cluster" {
  description = "Name, location and private endpoint of the GKE cluster (gcloud container clusters get-credentials)."
  value = {
    name             = module.gke.cluster_name
    location         = module.gke.cluster_location
    private_endpoint = module.gke.private_endpoint
  }
}

output "binauthz_attestor" {
  description = "Binary Authorization attestor the release pipeline signs attestations for."
  value       = module.gke.attestor
}

output "nat_ips" {
  description = "Cloud NAT's static egress addresses: give these to each PSP to allowlist."
  value       = module.network.nat_ips
}

output "network_ranges" {
  description = "Ranges deploy/k8s NetworkPolicies name: restricted Google APIs VIP, private services (Cloud SQL, Memorystore), control plane, nodes, Pods, Services."
  value = {
    restricted_googleapis = module.network.restricted_vip_cidr
    private_services      = var.private_services_cidr
    master                = var.master_cidr
    nodes                 = var.nodes_cidr
    pods                  = var.pods_cidr
    services              = var.services_cidr
  }
}

output "log_buckets" {
  description = "The vault's audit and access log buckets (retention log_retention_days)."
  value       = module.logging.bucket_ids
}
