variable "project_id" {
  description = "Project that holds the VPC."
  type        = string
}

variable "region" {
  description = "Region of the subnet, the router and Cloud NAT."
  type        = string
}

variable "nodes_cidr" {
  description = "Primary range of the GKE nodes' subnet."
  type        = string
}

variable "pods_cidr" {
  description = "Secondary range for Pod IPs (VPC-native GKE)."
  type        = string
}

variable "services_cidr" {
  description = "Secondary range for ClusterIP Services."
  type        = string
}

variable "master_cidr" {
  description = "The /28 of the GKE control plane's private endpoint."
  type        = string
}

variable "private_services_cidr" {
  description = "Range reserved for private services access (Cloud SQL, Memorystore)."
  type        = string
}

variable "psp_egress_cidrs" {
  description = "The processors' published ranges; the only internet destinations, on 443, through Cloud NAT."
  type        = list(string)
}

variable "nat_ip_count" {
  description = "Static external addresses of Cloud NAT: the source IPs PSPs allowlist."
  type        = number
}

variable "edge_node_tag" {
  description = "Network tag of the nodes the edge gateway runs on (the general pool): the only target of internet ingress."
  type        = string
}

variable "edge_load_balancer" {
  description = "The edge gateway's LoadBalancer Service (deploy/k8s): its port and its pinned healthCheckNodePort."
  type = object({
    port                   = number
    health_check_node_port = number
  })
}
