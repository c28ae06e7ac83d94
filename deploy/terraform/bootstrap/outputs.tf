output "state_bucket" {
  description = "Pass to `terraform init -backend-config=bucket=...` of the root and org/ modules."
  value       = google_storage_bucket.state.name
}

output "project_number" {
  description = "The project's number (org/ module input)."
  value       = data.google_project.this.number
}
