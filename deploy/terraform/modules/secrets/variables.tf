variable "project_id" {
  description = "Project of the secrets."
  type        = string
}

variable "region" {
  description = "The one location the secrets are replicated to (user-managed replication, regional CMEK)."
  type        = string
}

variable "kms_key_name" {
  description = "CMEK for the secrets' payloads."
  type        = string
}

variable "service_account_emails" {
  description = "GSA e-mails by name (module iam)."
  type        = map(string)
}
