locals {
  # Network tags of the node pools; the edge load balancer's firewall rules target the general
  # pool only (the gateway's pods do not tolerate the CDE pool's taint).
  node_tags = {
    cde     = "tessera-cde-nodes"
    general = "tessera-general-nodes"
  }
  # deploy/k8s/base/edge/gateway.yaml, Service tessera-ingressgateway: type LoadBalancer (an
  # external passthrough Network Load Balancer), externalTrafficPolicy Local. Packets reach the
  # nodes on the Service's port; the load balancer health-checks healthCheckNodePort, pinned
  # there so that this firewall can name it (tests/test_deploy_consistency.py compares them).
  edge_load_balancer = {
    port                   = 443
    health_check_node_port = 32443
  }
}

module "network" {
  source = "./modules/network"

  project_id            = var.project_id
  region                = var.region
  nodes_cidr            = var.nodes_cidr
  pods_cidr             = var.pods_cidr
  services_cidr         = var.services_cidr
  master_cidr           = var.master_cidr
  private_services_cidr = var.private_services_cidr
  psp_egress_cidrs      = var.psp_egress_cidrs
  nat_ip_count          = var.nat_ip_count
  edge_node_tag         = local.node_tags.general
  edge_load_balancer    = local.edge_load_balancer

  depends_on = [google_project_service.apis]
}

module "iam" {
  source = "./modules/iam"

  project_id    = var.project_id
  workload_pool = module.gke.workload_pool

  depends_on = [google_project_service.apis]
}

module "kms" {
  source = "./modules/kms"

  project_id                  = var.project_id
  region                      = var.region
  vault_service_account_email = module.iam.emails["tessera-vault"]
  key_admins                  = var.kms_key_admins
  kek_crypto_members          = var.kek_crypto_members
  cmek_users = {
    cloudsql = [local.service_agents.cloudsql]
    gke-etcd = [local.service_agents.gke]
    disks    = [local.service_agents.compute]
    logs     = [local.service_agents.logging]
    secrets  = [local.service_agents.secrets]
    redis    = [local.service_agents.redis]
  }

  depends_on = [google_project_service.apis, google_project_service_identity.agents]
}

module "gke" {
  source = "./modules/gke"

  project_id                     = var.project_id
  region                         = var.region
  network_id                     = module.network.network_id
  subnetwork_id                  = module.network.subnetwork_id
  pods_range_name                = module.network.pods_range_name
  services_range_name            = module.network.services_range_name
  master_cidr                    = var.master_cidr
  master_authorized_networks     = var.master_authorized_networks
  release_channel                = var.gke_release_channel
  etcd_kms_key_name              = module.kms.cmek_key_names["gke-etcd"]
  boot_disk_kms_key_name         = module.kms.cmek_key_names["disks"]
  node_service_account_email     = module.iam.nodes_email
  security_group                 = var.gke_security_group
  cde_pool                       = var.cde_pool
  general_pool                   = var.general_pool
  attestor_public_key_pem        = var.attestor_public_key_pem
  binauthz_exempt_image_patterns = var.binauthz_exempt_image_patterns
  enable_fqdn_network_policy     = var.enable_fqdn_network_policy
  node_tags                      = local.node_tags
}

module "cloudsql" {
  source = "./modules/cloudsql"

  project_id                  = var.project_id
  region                      = var.region
  network_id                  = module.network.network_id
  private_services_range_name = module.network.private_services_range_name
  private_services_connection = module.network.private_services_connection
  kms_key_name                = module.kms.cmek_key_names["cloudsql"]
  api_tier                    = var.cloudsql_api_tier
  vault_tier                  = var.cloudsql_vault_tier
  service_account_emails      = module.iam.emails
}

module "memorystore" {
  source = "./modules/memorystore"

  project_id                  = var.project_id
  region                      = var.region
  network_id                  = module.network.network_id
  private_services_range_name = module.network.private_services_range_name
  private_services_connection = module.network.private_services_connection
  kms_key_name                = module.kms.cmek_key_names["redis"]
  api_memory_size_gb          = var.redis_api_memory_size_gb
  vault_memory_size_gb        = var.redis_vault_memory_size_gb
}

module "secrets" {
  source = "./modules/secrets"

  project_id             = var.project_id
  region                 = var.region
  kms_key_name           = module.kms.cmek_key_names["secrets"]
  service_account_emails = module.iam.emails
}

module "logging" {
  source = "./modules/logging"

  project_id     = var.project_id
  region         = var.region
  kms_key_name   = module.kms.cmek_key_names["logs"]
  retention_days = var.log_retention_days
  locked         = var.lock_log_buckets
}
