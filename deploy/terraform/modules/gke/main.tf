locals {
  cluster_name = "tessera"
  # What the two node pools do not share; the pool resource states the rest once. Each pool's
  # network tag is var.node_tags[POOL] (the edge's firewall rules target the general pool's).
  node_pools = {
    # The vault only: label + taint, and only the vault's Pods tolerate the taint.
    cde = {
      labels    = { "tessera.dev/pool" = "cde" }
      taints    = [{ key = "tessera.dev/cde", value = "true", effect = "NO_SCHEDULE" }]
      pci_scope = "cde"
    }
    # API, worker, Locust, cluster add-ons.
    general = {
      labels    = { "tessera.dev/pool" = "general" }
      taints    = []
      pci_scope = "connected"
    }
  }
  # Module variables, apart: checkov expands a for_each only over values it can resolve.
  pool_sizes = {
    cde     = var.cde_pool
    general = var.general_pool
  }
}

resource "google_container_cluster" "tessera" {
  # checkov:skip=CKV_GCP_24: PodSecurityPolicy was removed in Kubernetes 1.25; Pod Security Admission labels on the namespaces (deploy/k8s) replace it.
  # google-beta: enable_fqdn_network_policy was added to the beta provider first; the beta
  # provider takes every other argument used here unchanged.
  provider = google-beta
  project  = var.project_id
  name     = local.cluster_name
  location = var.region

  network         = var.network_id
  subnetwork      = var.subnetwork_id
  networking_mode = "VPC_NATIVE"

  ip_allocation_policy {
    cluster_secondary_range_name  = var.pods_range_name
    services_secondary_range_name = var.services_range_name
  }

  # Node pools are separate resources; the default pool is removed at creation.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = true

  # Dataplane V2 (eBPF): enforces NetworkPolicy itself (so the Calico network_policy stays off)
  # and is what FQDNNetworkPolicy needs.
  datapath_provider          = "ADVANCED_DATAPATH"
  enable_fqdn_network_policy = var.enable_fqdn_network_policy

  # GKE would otherwise open every LoadBalancer Service's port to its source ranges on every
  # node, CDE pool included; the network module's tessera-allow-ingress-edge and
  # tessera-allow-ingress-health-checks open the edge gateway's on the general pool only.
  disable_l4_lb_firewall_reconciliation = true

  network_policy {
    enabled = false
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = true
    master_ipv4_cidr_block  = var.master_cidr

    master_global_access_config {
      enabled = false
    }
  }

  master_authorized_networks_config {
    gcp_public_cidrs_access_enabled = false

    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  enable_legacy_abac          = false
  enable_kubernetes_alpha     = false
  enable_shielded_nodes       = true
  enable_intranode_visibility = true

  authenticator_groups_config {
    security_group = var.security_group
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  # Kubernetes Secrets encrypted in etcd with our key (application-layer secrets encryption).
  database_encryption {
    state    = "ENCRYPTED"
    key_name = var.etcd_kms_key_name
  }

  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  release_channel {
    channel = var.release_channel
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS", "APISERVER", "CONTROLLER_MANAGER", "SCHEDULER"]
  }

  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS", "APISERVER", "CONTROLLER_MANAGER", "SCHEDULER", "POD", "DEPLOYMENT", "HPA"]

    # Managed Service for Prometheus: scrapes the services' /metrics (PodMonitoring in deploy/k8s)
    # and feeds the HPA's requests-per-second metric.
    managed_prometheus {
      enabled = true
    }
  }

  security_posture_config {
    mode               = "BASIC"
    vulnerability_mode = "VULNERABILITY_BASIC"
  }

  addons_config {
    http_load_balancing {
      disabled = false
    }
    network_policy_config {
      disabled = true
    }
    gce_persistent_disk_csi_driver_config {
      enabled = true
    }
  }

  maintenance_policy {
    recurring_window {
      start_time = "2025-01-04T02:00:00Z"
      end_time   = "2025-01-04T06:00:00Z"
      recurrence = "FREQ=WEEKLY;BYDAY=SA,SU"
    }
  }

  # The removed default pool still needs a hardened template while it exists.
  node_config {
    service_account = var.node_service_account_email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  resource_labels = {
    app       = "tessera"
    pci-scope = "cde"
  }

  lifecycle {
    ignore_changes = [node_config]
  }
}

# --- Node pools: the CDE pool for the vault alone, the general pool for the rest -------------

resource "google_container_node_pool" "this" {
  for_each = local.node_pools
  project  = var.project_id
  name     = each.key
  cluster  = google_container_cluster.tessera.id
  location = var.region

  autoscaling {
    min_node_count = local.pool_sizes[each.key].min_per_zone
    max_node_count = local.pool_sizes[each.key].max_per_zone
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  upgrade_settings {
    max_surge       = 1
    max_unavailable = 0
  }

  node_config {
    machine_type      = local.pool_sizes[each.key].machine_type
    image_type        = "COS_CONTAINERD"
    disk_type         = "pd-balanced"
    disk_size_gb      = 50
    boot_disk_kms_key = var.boot_disk_kms_key_name
    service_account   = var.node_service_account_email
    oauth_scopes      = ["https://www.googleapis.com/auth/cloud-platform"]

    labels = each.value.labels
    tags   = [var.node_tags[each.key]]

    dynamic "taint" {
      for_each = each.value.taints
      content {
        key    = taint.value.key
        value  = taint.value.value
        effect = taint.value.effect
      }
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }

    resource_labels = {
      app       = "tessera"
      pci-scope = each.value.pci_scope
    }
  }
}

# Each pool was a resource of its own before: Terraform moves it in an existing state instead
# of replacing it (which would drain and recreate every node).
moved {
  from = google_container_node_pool.cde
  to   = google_container_node_pool.this["cde"]
}

moved {
  from = google_container_node_pool.general
  to   = google_container_node_pool.this["general"]
}

# --- Binary Authorization ------------------------------------------------------------------------
# GKE evaluates the project's singleton policy per cluster: a rule can name a cluster, not a
# namespace (the policy's namespace and service-account rules apply to other platforms, not GKE
# enforcement). So the whole tessera cluster, CDE and the rest, admits only attested images,
# which is stricter than the CDE alone needs. Per-namespace scoping exists only as continuous
# validation (audit findings, not admission), which deploy/terraform/README.md describes.

resource "google_container_analysis_note" "release" {
  project = var.project_id
  name    = "tessera-release"

  attestation_authority {
    hint {
      human_readable_name = "Tessera release pipeline: image built from a reviewed commit and scanned"
    }
  }
}

resource "google_binary_authorization_attestor" "release" {
  project = var.project_id
  name    = "tessera-release"

  attestation_authority_note {
    note_reference = google_container_analysis_note.release.name

    # No id: Binary Authorization derives it from the PKIX key.
    public_keys {
      pkix_public_key {
        public_key_pem      = var.attestor_public_key_pem
        signature_algorithm = "ECDSA_P256_SHA256"
      }
    }
  }
}

resource "google_binary_authorization_policy" "tessera" {
  project = var.project_id

  # Google-maintained system images (kube-system, GKE add-ons) stay admitted.
  global_policy_evaluation_mode = "ENABLE"

  dynamic "admission_whitelist_patterns" {
    for_each = var.binauthz_exempt_image_patterns
    content {
      name_pattern = admission_whitelist_patterns.value
    }
  }

  # Any other cluster of the project admits nothing until it gets its own rule.
  default_admission_rule {
    evaluation_mode  = "ALWAYS_DENY"
    enforcement_mode = "ENFORCED_BLOCK_AND_AUDIT_LOG"
  }

  cluster_admission_rules {
    cluster                 = "${var.region}.${local.cluster_name}"
    evaluation_mode         = "REQUIRE_ATTESTATION"
    enforcement_mode        = "ENFORCED_BLOCK_AND_AUDIT_LOG"
    require_attestations_by = [google_binary_authorization_attestor.release.name]
  }
}
