variable "project_id" {
  description = "Project of the instances."
  type        = string
}

variable "region" {
  description = "Region of the instances (primary and replica in two zones)."
  type        = string
}

variable "network_id" {
  description = "The VPC the instances are reached from."
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
  description = "CMEK for the instances' data at rest."
  type        = string
}

variable "api_memory_size_gb" {
  description = "Memory of tessera-api's Redis (idempotency cache, circuit breakers)."
  type        = number
}

variable "vault_memory_size_gb" {
  description = "Memory of tessera-vault's Redis (sealed CVCs until their one authorization)."
  type        = number
}
