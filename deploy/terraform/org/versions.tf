# The VPC Service Controls perimeter, applied by an organization administrator (Access Context
# Manager Editor on the organization's policy), separately from the project's root module.
terraform {
  required_version = ">= 1.6"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.14"
    }
  }

  backend "gcs" {
    prefix = "tessera/vpc-sc"
  }
}

provider "google" {
  # Access Context Manager calls are billed and quota'd to a project the admin names.
  billing_project       = var.quota_project_id
  user_project_override = true
}
