variable "project_id" {
  description = "Project of the cluster."
  type        = string
}

variable "region" {
  description = "Region of the regional cluster (control plane and nodes in three zones)."
  type        = string
}

variable "network_id" {
  description = "The VPC's id."
  type        = string
}

variable "subnetwork_id" {
  description = "The nodes' subnet id."
  type        = string
}

variable "pods_range_name" {
  description = "Secondary range for Pods."
  type        = string
}

variable "services_range_name" {
  description = "Secondary range for Services."
  type        = string
}

variable "master_cidr" {
  description = "The control plane's private /28."
  type        = string
}

variable "master_authorized_networks" {
  description = "Ranges that may reach the control plane's private endpoint (bastion, CI runners)."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
}

variable "release_channel" {
  description = "GKE release channel."
  type        = string
}

variable "etcd_kms_key_name" {
  description = "CMEK for Kubernetes Secrets at rest in etcd (application-layer encryption)."
  type        = string
}

variable "boot_disk_kms_key_name" {
  description = "CMEK for the nodes' boot disks."
  type        = string
}

variable "node_service_account_email" {
  description = "Least-privilege service account of the nodes (never the Compute default)."
  type        = string
}

variable "security_group" {
  description = "Google Group for Kubernetes RBAC (gke-security-groups@DOMAIN)."
  type        = string
}

variable "cde_pool" {
  description = "Machine type and per-zone autoscaling bounds of the CDE node pool (vault only)."
  type = object({
    machine_type = string
    min_per_zone = number
    max_per_zone = number
  })
}

variable "general_pool" {
  description = "Machine type and per-zone autoscaling bounds of the general node pool."
  type = object({
    machine_type = string
    min_per_zone = number
    max_per_zone = number
  })
}

variable "attestor_public_key_pem" {
  description = "PEM public key (ECDSA P-256) whose signatures the release attestor accepts."
  type        = string
}

variable "binauthz_exempt_image_patterns" {
  description = "Image name patterns admitted without attestation (keep empty; mirror and attest instead)."
  type        = list(string)
}

variable "enable_fqdn_network_policy" {
  description = "FQDNNetworkPolicy (Dataplane V2; needs GKE Enterprise on the project)."
  type        = bool
}

variable "node_tags" {
  description = "Network tag of each node pool (cde, general); the edge load balancer's firewall rules target the general pool's."
  type = object({
    cde     = string
    general = string
  })
}
