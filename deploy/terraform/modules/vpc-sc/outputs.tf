output "perimeter_name" {
  description = "The service perimeter's full name."
  value       = google_access_context_manager_service_perimeter.tessera.name
}

output "access_level_name" {
  description = "The admins' access level's full name."
  value       = google_access_context_manager_access_level.admins.name
}
