output "bucket_ids" {
  description = "Full names of the vault's log buckets."
  value       = { for k, v in google_logging_project_bucket_config.vault : k => v.id }
}

output "sink_writer_identities" {
  description = "Writer identity of each sink."
  value       = { for k, v in google_logging_project_sink.vault : k => v.writer_identity }
}
