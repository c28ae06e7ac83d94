variable "access_policy_id" {
  description = "The organization's Access Context Manager policy number (accessPolicies/NUMBER without the prefix)."
  type        = string

  validation {
    condition     = can(regex("^[0-9]+$", var.access_policy_id))
    error_message = "access_policy_id is the policy's number."
  }
}

variable "project_number" {
  description = "Number (not id) of the Tessera project put inside the perimeter."
  type        = string

  validation {
    condition     = can(regex("^[0-9]+$", var.project_number))
    error_message = "project_number is numeric (gcloud projects describe PROJECT --format='value(projectNumber)')."
  }
}

variable "restricted_services" {
  description = "APIs the perimeter protects; Cloud KMS, Cloud SQL and Secret Manager must stay in it."
  type        = list(string)
  default     = ["cloudkms.googleapis.com", "sqladmin.googleapis.com", "secretmanager.googleapis.com"]

  validation {
    condition = alltrue([
      for s in ["cloudkms.googleapis.com", "sqladmin.googleapis.com", "secretmanager.googleapis.com"] :
      contains(var.restricted_services, s)
    ])
    error_message = "The perimeter must restrict cloudkms, sqladmin and secretmanager."
  }
}

variable "admin_ip_ranges" {
  description = "Public ranges of administrators' and CI's egress, admitted by the perimeter's access level."
  type        = list(string)

  validation {
    condition     = !contains(var.admin_ip_ranges, "0.0.0.0/0")
    error_message = "0.0.0.0/0 would make the access level meaningless."
  }
}

variable "admin_members" {
  description = "Identities (user: or serviceAccount:; access levels take no groups) that may call the restricted APIs from outside: Terraform CI, key administrators."
  type        = list(string)

  validation {
    condition     = alltrue([for m in var.admin_members : can(regex("^(user|serviceAccount):", m))])
    error_message = "Access levels accept user: and serviceAccount: members only."
  }
}

variable "vpc_allowed_services" {
  description = "APIs workloads inside the VPC may call (besides the restricted ones): what GKE nodes and Workload Identity need."
  type        = list(string)
  default = [
    "RESTRICTED-SERVICES",
    "artifactregistry.googleapis.com",
    "container.googleapis.com",
    "iamcredentials.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "sts.googleapis.com",
  ]
}

variable "dry_run" {
  description = "Write the perimeter as a dry-run spec (violations logged, not blocked) before enforcing it."
  type        = bool
  default     = true
}
