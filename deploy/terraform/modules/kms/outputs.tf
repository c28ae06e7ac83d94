output "key_ring_id" {
  description = "The key ring's full name."
  value       = google_kms_key_ring.tessera.id
}

output "vault_kek_name" {
  description = "projects/P/locations/L/keyRings/tessera/cryptoKeys/tessera-vault-kek: TESSERA_VAULT_GCP_KMS_KEY_NAME."
  value       = google_kms_crypto_key.vault_kek.id
}

output "cmek_key_names" {
  description = "Full names of the CMEK keys, by data store."
  value       = { for k, v in google_kms_crypto_key.cmek : k => v.id }
  # A data store created with a key its service agent cannot use yet fails: grant first.
  depends_on = [google_kms_crypto_key_iam_member.cmek_users]
}
