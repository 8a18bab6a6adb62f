"""What both services need at run time and is not the wire contract: the broker connection
(`mqtt`), retry backoff (`backoff`), durable file writes (`durable`), keeping secrets out of
logs (`secrets`) and process supervision (`process`). Imports tilebridge_protocol only."""
