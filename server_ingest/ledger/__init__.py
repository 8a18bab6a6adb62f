"""The ingest's durable memory: an interface (`base.Ledger`), typed records (`records`), the
embedded SQLite implementation (`sqlite`) and the one thread that writes it (`writer`)."""
