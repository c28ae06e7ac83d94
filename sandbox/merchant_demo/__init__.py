"""The demo merchant: a checkout page with Tessera's hosted card fields, and its small back end."""
