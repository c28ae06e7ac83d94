variable "project_id" {
  description = "Project of the instances."
  type        = string
}

variable "region" {
  description = "Region of the instances (primary and standby in two zones of it)."
  type        = string
}

variable "network_id" {
  description = "The VPC the instances get their private IP in."
  type        = string
}

variable "private_services_range_name" {
  description = "The private services access range to allocate from."
  type        = string
}

variable "private_services_connection" {
  description = "The service networking peering (the instances wait for it)."
  type        = string
}

variable "kms_key_name" {
  description = "CMEK for the instances' disks and backups."
  type        = string
}

variable "api_tier" {
  description = "Machine tier of tessera-api."
  type        = string
}

variable "vault_tier" {
  description = "Machine tier of tessera-vault."
  type        = string
}

variable "service_account_emails" {
  description = "GSA e-mails by name (module iam): the IAM database users and their instance-scoped grants."
  type        = map(string)
}
