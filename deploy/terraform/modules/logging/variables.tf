variable "project_id" {
  description = "Project whose logs are routed."
  type        = string
}

variable "region" {
  description = "Location of the log buckets (the CMEK key's location)."
  type        = string
}

variable "kms_key_name" {
  description = "CMEK of the log buckets."
  type        = string
}

variable "retention_days" {
  description = "Days the vault's audit and access logs are kept (PCI DSS 10.5.1: at least a year)."
  type        = number

  validation {
    condition     = var.retention_days >= 365
    error_message = "PCI DSS 10.5.1 asks for at least 12 months of audit log history: retention_days >= 365."
  }
}

variable "locked" {
  description = "Lock the buckets: retention can then never be shortened nor the bucket deleted (irreversible)."
  type        = bool
}
