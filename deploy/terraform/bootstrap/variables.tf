variable "project_id" {
  description = "The Tessera project."
  type        = string
}

variable "region" {
  description = "Location of the state bucket and its key."
  type        = string
}

variable "state_bucket_name" {
  description = "Globally unique name of the Terraform state bucket."
  type        = string
}

variable "state_admins" {
  description = "Principals that run Terraform (CI's service account): objectAdmin on the state bucket."
  type        = list(string)
}
