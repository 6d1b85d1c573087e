"""pathguard detection service (FastAPI)."""
