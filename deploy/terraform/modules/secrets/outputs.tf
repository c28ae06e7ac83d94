output "secret_ids" {
  description = "Full resource name of each secret container, by secret id."
  value       = { for k, v in google_secret_manager_secret.tessera : k => v.id }
}

output "readers" {
  description = "Secret id -> the GSAs that may read it."
  value       = local.readers
}
