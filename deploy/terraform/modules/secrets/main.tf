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
    # Both Memorystore instances' CA certificates (one PEM bundle), which the Redis clients
    # verify: not confidential, but delivered as a file the same way as the rest.
    tessera-redis-server-ca = ["tessera-vault", "tessera-api", "tessera-worker"]
    # The edge gateway's public certificate and its private key (browsers' TLS: card numbers
    # cross it), for the gateway alone.
    tessera-edge-tls-cert = ["tessera-edge"]
    tessera-edge-tls-key  = ["tessera-edge"]
  }
  # Identities whose pods see card data (deploy/k8s: tessera-cde, -edge, -admin); a secret any
  # of them reads is labelled CDE.
  cde_gsas = ["tessera-vault", "tessera-vault-migrate", "tessera-edge", "tessera-admin"]
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
    pci-scope = length(setintersection(each.value, local.cde_gsas)) > 0 ? "cde" : "connected"
  }
}

resource "google_secret_manager_secret_iam_member" "reader" {
  for_each  = local.grants
  project   = var.project_id
  secret_id = google_secret_manager_secret.tessera[each.value.secret].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${var.service_account_emails[each.value.gsa]}"
}
