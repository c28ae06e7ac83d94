"""Hosted card fields: the vault serves a small library for merchants' pages and the card-field
iframe, so a card number is typed into, and sent from, the vault's own origin only."""
