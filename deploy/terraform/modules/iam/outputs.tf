output "emails" {
  description = "GSA e-mail by name (tessera-vault, tessera-vault-migrate, tessera-api, tessera-worker, tessera-api-migrate, tessera-admin, tessera-edge)."
  # Built from account_id (known at plan) rather than `email` (known after apply), so callers can
  # use it in for_each keys while still depending on the account.
  value = { for k, v in google_service_account.workload : k => "${v.account_id}@${var.project_id}.iam.gserviceaccount.com" }
}

output "workload_identity_members" {
  description = "GSA name -> the Workload Identity member bound to it."
  value       = { for k, v in google_service_account_iam_member.workload_identity : k => v.member }
}

output "nodes_email" {
  description = "The GKE nodes' service account."
  value       = "${google_service_account.nodes.account_id}@${var.project_id}.iam.gserviceaccount.com"
}
