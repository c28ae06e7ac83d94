variable "project_id" {
  description = "The Google Cloud project Tessera runs in (one project per environment)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "A project id: 6-30 lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  description = "Region of every regional resource (GKE, Cloud SQL, Memorystore, KMS key ring, log buckets, NAT)."
  type        = string
  default     = "europe-west1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "A region name such as europe-west1."
  }
}

variable "nodes_cidr" {
  description = "Primary range of the nodes' subnet."
  type        = string
  default     = "10.10.0.0/20"

  validation {
    condition     = can(cidrnetmask(var.nodes_cidr))
    error_message = "An IPv4 CIDR."
  }
}

variable "pods_cidr" {
  description = "Secondary range for Pods (NetworkPolicies name it for in-cluster peers)."
  type        = string
  default     = "10.20.0.0/14"

  validation {
    condition     = can(cidrnetmask(var.pods_cidr))
    error_message = "An IPv4 CIDR."
  }
}

variable "services_cidr" {
  description = "Secondary range for ClusterIP Services."
  type        = string
  default     = "10.24.0.0/20"

  validation {
    condition     = can(cidrnetmask(var.services_cidr))
    error_message = "An IPv4 CIDR."
  }
}

variable "master_cidr" {
  description = "The GKE control plane's private /28 (NetworkPolicies allow webhooks from it)."
  type        = string
  default     = "172.16.0.0/28"

  validation {
    condition     = can(cidrnetmask(var.master_cidr)) && endswith(var.master_cidr, "/28")
    error_message = "GKE needs a /28 for the control plane."
  }
}

variable "private_services_cidr" {
  description = "Private services access range: Cloud SQL and Memorystore addresses (NetworkPolicies allow egress to it)."
  type        = string
  default     = "10.30.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.private_services_cidr)) && tonumber(split("/", var.private_services_cidr)[1]) <= 24
    error_message = "An IPv4 CIDR of /24 or larger (/16 recommended)."
  }
}

variable "master_authorized_networks" {
  description = "Internal ranges that may reach the private control plane (bastion subnet, CI runners' subnet)."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))

  validation {
    condition     = length(var.master_authorized_networks) > 0 && alltrue([for n in var.master_authorized_networks : n.cidr_block != "0.0.0.0/0"])
    error_message = "The control plane is never open to 0.0.0.0/0."
  }
}

variable "psp_egress_cidrs" {
  description = "The processors' published address ranges: the only internet destinations (tcp/443, via Cloud NAT)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.psp_egress_cidrs : can(cidrnetmask(c)) && c != "0.0.0.0/0"])
    error_message = "IPv4 CIDRs, never 0.0.0.0/0: egress to the internet is to named processors only."
  }
}

variable "nat_ip_count" {
  description = "How many static NAT addresses to reserve (each ~64k ports per destination)."
  type        = number
  default     = 2

  validation {
    condition     = var.nat_ip_count >= 1 && var.nat_ip_count <= 8
    error_message = "Between 1 and 8."
  }
}

variable "gke_release_channel" {
  description = "GKE release channel (control plane and node auto-upgrades)."
  type        = string
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.gke_release_channel)
    error_message = "RAPID, REGULAR or STABLE."
  }
}

variable "gke_security_group" {
  description = "The Google Group that holds the groups Kubernetes RBAC binds to (gke-security-groups@DOMAIN)."
  type        = string

  validation {
    condition     = can(regex("^gke-security-groups@[a-z0-9.-]+$", var.gke_security_group))
    error_message = "GKE requires the group to be named gke-security-groups@YOUR-DOMAIN."
  }
}

variable "cde_pool" {
  description = "The CDE node pool (vault only): machine type and autoscaling bounds per zone."
  type = object({
    machine_type = string
    min_per_zone = number
    max_per_zone = number
  })
  default = { machine_type = "n2-standard-4", min_per_zone = 1, max_per_zone = 3 }

  validation {
    condition     = var.cde_pool.min_per_zone >= 1 && var.cde_pool.max_per_zone >= var.cde_pool.min_per_zone
    error_message = "At least one node per zone (the vault spreads over zones) and max >= min."
  }
}

variable "general_pool" {
  description = "The general node pool (API, worker, Locust): machine type and autoscaling bounds per zone."
  type = object({
    machine_type = string
    min_per_zone = number
    max_per_zone = number
  })
  default = { machine_type = "n2-standard-4", min_per_zone = 1, max_per_zone = 10 }

  validation {
    condition     = var.general_pool.min_per_zone >= 1 && var.general_pool.max_per_zone >= var.general_pool.min_per_zone
    error_message = "At least one node per zone and max >= min."
  }
}

variable "attestor_public_key_pem" {
  description = "PEM public key (ECDSA P-256) of the release pipeline's signing key; Binary Authorization admits only images it attested."
  type        = string

  validation {
    condition     = startswith(trimspace(var.attestor_public_key_pem), "-----BEGIN PUBLIC KEY-----")
    error_message = "A PEM public key (-----BEGIN PUBLIC KEY-----)."
  }
}

variable "binauthz_exempt_image_patterns" {
  description = "Image patterns admitted without attestation. Keep empty: mirror third-party images (Cloud SQL Auth Proxy, Locust) and attest them."
  type        = list(string)
  default     = []
}

variable "enable_fqdn_network_policy" {
  description = "Enable FQDNNetworkPolicy (the vault's egress to PSP host names); needs GKE Enterprise on the project."
  type        = bool
  default     = true
}

variable "kms_key_admins" {
  description = "Who manages the keys (roles/cloudkms.admin on the key ring): rotate, disable, destroy, set IAM; never encrypt or decrypt."
  type        = list(string)

  validation {
    condition     = length(var.kms_key_admins) > 0 && alltrue([for m in var.kms_key_admins : can(regex("^(user|group|serviceAccount):", m))])
    error_message = "At least one user:, group: or serviceAccount: principal."
  }
}

variable "kek_crypto_members" {
  description = "Workload identities besides the vault's GSA with encrypt/decrypt on the KEK (e.g. a rewrap Job). Never a person."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.kek_crypto_members : startswith(m, "serviceAccount:")])
    error_message = "Only serviceAccount: members may encrypt/decrypt with the KEK; no user:, group: or domain: principal."
  }
}

variable "cloudsql_api_tier" {
  description = "Machine tier of the tessera-api instance."
  type        = string
  default     = "db-custom-4-16384"
}

variable "cloudsql_vault_tier" {
  description = "Machine tier of the tessera-vault instance."
  type        = string
  default     = "db-custom-2-7680"
}

variable "redis_api_memory_size_gb" {
  description = "Memory (GB) of the API's Memorystore instance."
  type        = number
  default     = 5

  validation {
    condition     = var.redis_api_memory_size_gb >= 1
    error_message = "At least 1 GB."
  }
}

variable "redis_vault_memory_size_gb" {
  description = "Memory (GB) of the vault's Memorystore instance."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_vault_memory_size_gb >= 1
    error_message = "At least 1 GB."
  }
}

variable "log_retention_days" {
  description = "Retention of the vault's audit and access log buckets (PCI DSS 10.5.1: >= 365)."
  type        = number
  default     = 400

  validation {
    condition     = var.log_retention_days >= 365 && var.log_retention_days <= 3650
    error_message = "Between 365 (PCI DSS 10.5.1: a year of history) and 3650 days."
  }
}

variable "lock_log_buckets" {
  description = "Lock the log buckets (irreversible: retention can never be shortened, the bucket never deleted). false only in throw-away projects."
  type        = bool
  default     = true
}
