variable "project_id" {
  description = "Project of the key ring."
  type        = string
}

variable "region" {
  description = "Location of the key ring: the region of every resource whose CMEK it holds."
  type        = string
}

variable "vault_service_account_email" {
  description = "The vault's runtime GSA: encrypt/decrypt on the KEK, nothing else."
  type        = string
}

variable "key_admins" {
  description = "Principals that manage the keys (roles/cloudkms.admin on the key ring: no encrypt/decrypt)."
  type        = list(string)
}

variable "kek_crypto_members" {
  description = "Extra workload identities with encrypt/decrypt on the KEK (e.g. a rewrap Job's GSA); never humans."
  type        = list(string)
}

variable "cmek_users" {
  description = "Service agents that need encrypt/decrypt on each CMEK key, by key (cloudsql, gke-etcd, disks, logs, secrets, redis)."
  type        = map(list(string))
}
