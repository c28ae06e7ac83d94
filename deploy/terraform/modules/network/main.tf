locals {
  # restricted.googleapis.com: Google APIs that honour VPC Service Controls, reached without
  # the internet (Private Google Access). NetworkPolicies allow the vault's KMS calls to it.
  restricted_vip_cidr = "199.36.153.4/30"
  restricted_vip_ips  = ["199.36.153.4", "199.36.153.5", "199.36.153.6", "199.36.153.7"]
  psa_prefix          = split("/", var.private_services_cidr)
  # Where an external passthrough Network Load Balancer's health checks come from (Google's
  # load balancing firewall table); the edge gateway's Service is such a load balancer.
  health_check_ranges = ["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"]
  internal_ranges     = [var.nodes_cidr, var.pods_cidr, var.services_cidr]
}

resource "google_compute_network" "tessera" {
  project                         = var.project_id
  name                            = "tessera"
  auto_create_subnetworks         = false
  routing_mode                    = "REGIONAL"
  delete_default_routes_on_create = false
}

resource "google_compute_subnetwork" "nodes" {
  project                  = var.project_id
  name                     = "tessera-nodes"
  region                   = var.region
  network                  = google_compute_network.tessera.id
  ip_cidr_range            = var.nodes_cidr
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "tessera-pods"
    ip_cidr_range = var.pods_cidr
  }

  secondary_ip_range {
    range_name    = "tessera-services"
    ip_cidr_range = var.services_cidr
  }

  # PCI DSS 10.2: flows of the whole segment, kept by Cloud Logging.
  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 1.0
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Private Google Access to the restricted VIP, as its own route so that removing the default
# internet route later (for a fully air-gapped variant) keeps Google APIs reachable.
resource "google_compute_route" "restricted_googleapis" {
  project          = var.project_id
  name             = "tessera-restricted-googleapis"
  network          = google_compute_network.tessera.id
  dest_range       = local.restricted_vip_cidr
  next_hop_gateway = "default-internet-gateway"
  priority         = 100
}

# Private services access: Cloud SQL and Memorystore get addresses from this range, peered.
resource "google_compute_global_address" "private_services" {
  project       = var.project_id
  name          = "tessera-private-services"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  address       = local.psa_prefix[0]
  prefix_length = tonumber(local.psa_prefix[1])
  network       = google_compute_network.tessera.id
}

resource "google_service_networking_connection" "private_services" {
  network                 = google_compute_network.tessera.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.private_services.name]
}

# --- Cloud NAT: the only way out to the internet, from fixed addresses PSPs allowlist --------

resource "google_compute_address" "nat" {
  count        = var.nat_ip_count
  project      = var.project_id
  name         = "tessera-nat-${count.index}"
  region       = var.region
  address_type = "EXTERNAL"
  network_tier = "PREMIUM"
}

resource "google_compute_router" "tessera" {
  project = var.project_id
  name    = "tessera"
  region  = var.region
  network = google_compute_network.tessera.id
}

resource "google_compute_router_nat" "tessera" {
  project                             = var.project_id
  name                                = "tessera-nat"
  router                              = google_compute_router.tessera.name
  region                              = var.region
  nat_ip_allocate_option              = "MANUAL_ONLY"
  nat_ips                             = google_compute_address.nat[*].self_link
  source_subnetwork_ip_ranges_to_nat  = "LIST_OF_SUBNETWORKS"
  enable_endpoint_independent_mapping = false

  subnetwork {
    name                    = google_compute_subnetwork.nodes.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  log_config {
    enable = true
    filter = "ALL"
  }
}

# --- Firewall: deny every egress, then allow only what flows.yaml needs -----------------------

resource "google_compute_firewall" "deny_all_egress" {
  project            = var.project_id
  name               = "tessera-deny-all-egress"
  network            = google_compute_network.tessera.id
  direction          = "EGRESS"
  priority           = 65534
  destination_ranges = ["0.0.0.0/0"]

  deny {
    protocol = "all"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "deny_all_ingress" {
  project       = var.project_id
  name          = "tessera-deny-all-ingress"
  network       = google_compute_network.tessera.id
  direction     = "INGRESS"
  priority      = 65534
  source_ranges = ["0.0.0.0/0"]

  deny {
    protocol = "all"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Inside the cluster (nodes, Pods, Services): NetworkPolicies decide, per Pod, what may talk.
resource "google_compute_firewall" "allow_egress_intra_cluster" {
  project            = var.project_id
  name               = "tessera-allow-egress-intra-cluster"
  network            = google_compute_network.tessera.id
  direction          = "EGRESS"
  priority           = 1000
  destination_ranges = local.internal_ranges

  allow {
    protocol = "tcp"
  }

  allow {
    protocol = "udp"
  }

  allow {
    protocol = "icmp"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "allow_ingress_intra_cluster" {
  project       = var.project_id
  name          = "tessera-allow-ingress-intra-cluster"
  network       = google_compute_network.tessera.id
  direction     = "INGRESS"
  priority      = 1000
  source_ranges = local.internal_ranges

  allow {
    protocol = "tcp"
  }

  allow {
    protocol = "udp"
  }

  allow {
    protocol = "icmp"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Nodes to the GKE control plane's private endpoint (kubelet, konnectivity).
resource "google_compute_firewall" "allow_egress_control_plane" {
  project            = var.project_id
  name               = "tessera-allow-egress-control-plane"
  network            = google_compute_network.tessera.id
  direction          = "EGRESS"
  priority           = 1000
  destination_ranges = [var.master_cidr]

  allow {
    protocol = "tcp"
    ports    = ["443", "10250"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Cloud SQL through the Auth Proxy (3307; 5432 for direct TLS) and Memorystore over TLS (6378).
resource "google_compute_firewall" "allow_egress_private_services" {
  project            = var.project_id
  name               = "tessera-allow-egress-private-services"
  network            = google_compute_network.tessera.id
  direction          = "EGRESS"
  priority           = 1000
  destination_ranges = [var.private_services_cidr]

  allow {
    protocol = "tcp"
    ports    = ["3307", "5432", "6378"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Google APIs (Cloud KMS, Secret Manager, Logging, Artifact Registry) through the restricted VIP.
resource "google_compute_firewall" "allow_egress_restricted_googleapis" {
  project            = var.project_id
  name               = "tessera-allow-egress-restricted-googleapis"
  network            = google_compute_network.tessera.id
  direction          = "EGRESS"
  priority           = 1000
  destination_ranges = [local.restricted_vip_cidr]

  allow {
    protocol = "tcp"
    ports    = ["443"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# The processors, through Cloud NAT. FQDNNetworkPolicy narrows this per Pod to named PSP hosts.
resource "google_compute_firewall" "allow_egress_psps" {
  count              = length(var.psp_egress_cidrs) > 0 ? 1 : 0
  project            = var.project_id
  name               = "tessera-allow-egress-psps"
  network            = google_compute_network.tessera.id
  direction          = "EGRESS"
  priority           = 1000
  destination_ranges = var.psp_egress_cidrs

  allow {
    protocol = "tcp"
    ports    = ["443"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# --- The edge gateway's load balancer: the cluster's only door from the internet -------------
# deploy/k8s/base/edge/gateway.yaml publishes the Istio gateway as a LoadBalancer Service
# (externalTrafficPolicy Local), which GKE implements as an external passthrough Network Load
# Balancer: packets keep the client's address and the Service's port (443) up to the node,
# which hands them to a gateway Pod's 8443 (its NetworkPolicy admits 8443 from anywhere).
# The cluster has disable_l4_lb_firewall_reconciliation, so GKE creates no rules of its own for
# LoadBalancer Services (its would open the port on every node, CDE pool included): these two
# are the only ingress from outside the VPC, and only to the general pool's nodes.

resource "google_compute_firewall" "allow_ingress_edge" {
  project       = var.project_id
  name          = "tessera-allow-ingress-edge"
  network       = google_compute_network.tessera.id
  direction     = "INGRESS"
  priority      = 1000
  source_ranges = ["0.0.0.0/0"]
  target_tags   = [var.edge_node_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.edge_load_balancer.port)]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# The load balancer's health checks: with externalTrafficPolicy Local they probe the Service's
# healthCheckNodePort on each node, which answers healthy only where a gateway Pod runs.
resource "google_compute_firewall" "allow_ingress_health_checks" {
  project       = var.project_id
  name          = "tessera-allow-ingress-health-checks"
  network       = google_compute_network.tessera.id
  direction     = "INGRESS"
  priority      = 1000
  source_ranges = local.health_check_ranges
  target_tags   = [var.edge_node_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.edge_load_balancer.health_check_node_port)]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# --- Private DNS: Google API names resolve to the restricted VIP inside the VPC ---------------

resource "google_dns_managed_zone" "restricted" {
  for_each    = toset(["googleapis.com", "pkg.dev", "gcr.io"])
  project     = var.project_id
  name        = "tessera-${replace(each.key, ".", "-")}"
  dns_name    = "${each.key}."
  description = "Resolves ${each.key} to restricted.googleapis.com (VPC Service Controls VIP)."
  visibility  = "private"

  private_visibility_config {
    networks {
      network_url = google_compute_network.tessera.id
    }
  }
}

resource "google_dns_record_set" "restricted_a" {
  project      = var.project_id
  managed_zone = google_dns_managed_zone.restricted["googleapis.com"].name
  name         = "restricted.googleapis.com."
  type         = "A"
  ttl          = 300
  rrdatas      = local.restricted_vip_ips
}

resource "google_dns_record_set" "restricted_cname" {
  for_each     = google_dns_managed_zone.restricted
  project      = var.project_id
  managed_zone = each.value.name
  name         = "*.${each.key}."
  type         = "CNAME"
  ttl          = 300
  rrdatas      = ["restricted.googleapis.com."]
}

resource "google_dns_record_set" "apex_a" {
  for_each     = toset(["pkg.dev", "gcr.io"])
  project      = var.project_id
  managed_zone = google_dns_managed_zone.restricted[each.key].name
  name         = "${each.key}."
  type         = "A"
  ttl          = 300
  rrdatas      = local.restricted_vip_ips
}
