output "connection_names" {
  description = "PROJECT:REGION:INSTANCE of tessera-api and tessera-vault, for the Cloud SQL Auth Proxy."
  value       = { for key, instance in google_sql_database_instance.this : key => instance.connection_name }
}

output "private_ips" {
  description = "Private IPs of the instances (inside the private services range)."
  value       = { for key, instance in google_sql_database_instance.this : key => instance.private_ip_address }
}

output "iam_users" {
  description = "Database user name of each GSA and the Postgres role to grant it (README: one-time grants)."
  value = {
    for k, u in local.iam_users : k => {
      user    = google_sql_user.iam[k].name
      pg_role = u.pg_role
    }
  }
}
