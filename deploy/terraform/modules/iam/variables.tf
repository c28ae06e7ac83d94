variable "project_id" {
  description = "Project of the service accounts."
  type        = string
}

variable "workload_pool" {
  description = "The cluster's Workload Identity pool (PROJECT.svc.id.goog); taken from the cluster so the bindings wait for it."
  type        = string
}
