locals {
  human_prefixes = ["user:", "group:", "domain:"]
  # One HSM key per data store: revoking one store's access never touches another's.
  cmek_keys = {
    cloudsql = "tessera-cloudsql"
    gke-etcd = "tessera-gke-etcd"
    disks    = "tessera-gke-disks"
    logs     = "tessera-logs"
    secrets  = "tessera-secrets" # pragma: allowlist secret
    redis    = "tessera-redis"
  }
  crypto_members = concat(["serviceAccount:${var.vault_service_account_email}"], var.kek_crypto_members)
  crypto_humans = [
    for m in local.crypto_members : m if anytrue([for p in local.human_prefixes : startswith(m, p)])
  ]
}

resource "google_kms_key_ring" "tessera" {
  project  = var.project_id
  name     = "tessera"
  location = var.region
}

# The vault's key-encryption key. It wraps every data key the vault makes: the card records'
# DEKs, the per-merchant fingerprint (HMAC) keys and the audit log's key, each with AAD bound to
# its purpose and merchant (vault/keys.py). One HSM key, one rotation schedule; no second key.
resource "google_kms_crypto_key" "vault_kek" {
  name                       = "tessera-vault-kek"
  key_ring                   = google_kms_key_ring.tessera.id
  purpose                    = "ENCRYPT_DECRYPT"
  rotation_period            = "7776000s" # 90 days (PCI DSS 3.7.4); old versions keep decrypting
  destroy_scheduled_duration = "2592000s" # 30 days to cancel a version's destruction

  version_template {
    algorithm        = "GOOGLE_SYMMETRIC_ENCRYPTION"
    protection_level = "HSM"
  }

  labels = {
    app       = "tessera"
    pci-scope = "cde"
    purpose   = "vault-kek"
  }

  lifecycle {
    prevent_destroy = true
  }
}

resource "google_kms_crypto_key" "cmek" {
  for_each                   = local.cmek_keys
  name                       = each.value
  key_ring                   = google_kms_key_ring.tessera.id
  purpose                    = "ENCRYPT_DECRYPT"
  rotation_period            = "7776000s"
  destroy_scheduled_duration = "2592000s"

  version_template {
    algorithm        = "GOOGLE_SYMMETRIC_ENCRYPTION"
    protection_level = "HSM"
  }

  labels = {
    app     = "tessera"
    purpose = "cmek-${each.key}"
  }

  lifecycle {
    prevent_destroy = true
  }
}

# --- Who may use the KEK -------------------------------------------------------------------------

resource "google_kms_crypto_key_iam_member" "kek_crypto" {
  for_each      = toset(local.crypto_members)
  crypto_key_id = google_kms_crypto_key.vault_kek.id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = each.value

  lifecycle {
    # PCI DSS 3.6.1.2 / split knowledge: no person can both manage keys and use them, and no
    # person uses the KEK at all (only the vault's workload identity does).
    precondition {
      condition     = length(local.crypto_humans) == 0
      error_message = "Encrypt/decrypt on the KEK is for workload identities only; remove user:/group:/domain: members: ${join(", ", local.crypto_humans)}."
    }
    precondition {
      condition     = length(setintersection(toset(local.crypto_members), toset(var.key_admins))) == 0
      error_message = "A key administrator may not also encrypt/decrypt with the KEK."
    }
  }
}

# The vault's /keys/rewrap reads the key's primary version (GetCryptoKey): viewer, no crypto.
resource "google_kms_crypto_key_iam_member" "kek_vault_viewer" {
  crypto_key_id = google_kms_crypto_key.vault_kek.id
  role          = "roles/cloudkms.viewer"
  member        = "serviceAccount:${var.vault_service_account_email}"
}

# Key administrators manage (rotate, disable, schedule destruction, set IAM) and cannot decrypt.
resource "google_kms_key_ring_iam_member" "admins" {
  for_each    = toset(var.key_admins)
  key_ring_id = google_kms_key_ring.tessera.id
  role        = "roles/cloudkms.admin"
  member      = each.value
}

# --- CMEK: each Google service agent gets its own key only ----------------------------------------

resource "google_kms_crypto_key_iam_member" "cmek_users" {
  for_each = merge([
    for key, members in var.cmek_users : { for m in members : "${key}/${m}" => { key = key, member = m } }
  ]...)
  crypto_key_id = google_kms_crypto_key.cmek[each.value.key].id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = each.value.member
}
