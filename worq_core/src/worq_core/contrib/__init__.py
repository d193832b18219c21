"""Optional integrations, each behind an extra of worq-core and imported only when used."""
