locals {
  # Secret -> the GSAs that may read it. Containers only: values are added by an operator
  # (`gcloud secrets versions add`), never by Terraform, so no secret value is in state or code.
  readers = {
    # The vault verifies it; the API and the worker present it.
    tessera-vault-service-token = ["tessera-vault", "tessera-api", "tessera-worker"]
    # The vault verifies it; only the admin tooling presents it.
    tessera-vault-admin-token      = ["tessera-vault", "tessera-admin"]
    tessera-vault-redis-auth       = ["tessera-vault"]
    tessera-api-webhook-secret-key = ["tessera-api", "tessera-worker"]
    tessera-api-psp-a-api-key      = ["tessera-api", "tessera-worker"]
    tessera-api-psp-b-api-key      = ["tessera-api", "tessera-worker"]
    tessera-api-psp-b-hmac-key     = ["tessera-api", "tessera-worker"]
    tessera-redis-auth             = ["tessera-api", "tessera-worker"]
  }
  grants = merge([
    for secret, gsas in local.readers : { for gsa in gsas : "${secret}/${gsa}" => { secret = secret, gsa = gsa } }
  ]...)
}

resource "google_secret_manager_secret" "tessera" {
  for_each  = local.readers
  project   = var.project_id
  secret_id = each.key

  replication {
    user_managed {
      replicas {
        location = var.region
        customer_managed_encryption {
          kms_key_name = var.kms_key_name
        }
      }
    }
  }

  labels = {
    app       = "tessera"
    pci-scope = startswith(each.key, "tessera-vault") ? "cde" : "connected"
  }
}

resource "google_secret_manager_secret_iam_member" "reader" {
  for_each  = local.grants
  project   = var.project_id
  secret_id = google_secret_manager_secret.tessera[each.value.secret].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${var.service_account_emails[each.value.gsa]}"
}
