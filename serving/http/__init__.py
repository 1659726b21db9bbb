"""HTTP: the FastAPI app and its routes (OpenAI-compatible /v1, admin, the dashboard), the
request schemas, access keys, request limits, uploads and the BentoML service."""
