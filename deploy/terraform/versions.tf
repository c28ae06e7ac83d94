terraform {
  required_version = ">= 1.6"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.28"
    }
    # For google_project_service_identity (the Cloud SQL, Memorystore and Secret Manager service
    # agents must exist before they are granted the CMEK keys) and the GKE cluster
    # (enable_fqdn_network_policy came to the beta provider first). 6.28 added the cluster's
    # disable_l4_lb_firewall_reconciliation.
    google-beta = {
      source  = "hashicorp/google-beta"
      version = "~> 6.28"
    }
  }

  # Partial configuration: `terraform init -backend-config="bucket=<state bucket>"`; the bucket
  # comes from bootstrap/ (versioned, CMEK, uniform access). State holds the Memorystore AUTH
  # strings (provider-computed), so the bucket is as sensitive as Secret Manager.
  backend "gcs" {
    prefix = "tessera/root"
  }
}
