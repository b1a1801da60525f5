"""The data wing: what ingest reads (format readers, the row sink), the canonical record,
personal data and secrets, near-duplicates, safety, representation, and where every input row
went (lineage, the incoming data's fingerprint)."""
