module "vpc_sc" {
  source = "../modules/vpc-sc"

  access_policy_id = var.access_policy_id
  project_number   = var.project_number
  admin_ip_ranges  = var.admin_ip_ranges
  admin_members    = var.admin_members
  dry_run          = var.dry_run
}

output "perimeter_name" {
  description = "The service perimeter's full name."
  value       = module.vpc_sc.perimeter_name
}
