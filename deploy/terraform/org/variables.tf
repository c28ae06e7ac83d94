variable "quota_project_id" {
  description = "Project the Access Context Manager API calls are billed to (usually the Tessera project)."
  type        = string
}

variable "access_policy_id" {
  description = "The organization's Access Context Manager policy number."
  type        = string
}

variable "project_number" {
  description = "Number of the Tessera project (root module output project_number)."
  type        = string
}

variable "admin_ip_ranges" {
  description = "Public egress ranges of administrators and CI."
  type        = list(string)
}

variable "admin_members" {
  description = "user:/serviceAccount: identities admitted from outside the perimeter (Terraform CI, key administrators)."
  type        = list(string)
}

variable "dry_run" {
  description = "true: dry-run spec only (log violations); false: enforce."
  type        = bool
  default     = true
}
