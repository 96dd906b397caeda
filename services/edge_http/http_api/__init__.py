"""The OpenAI HTTP front end: FastAPI endpoints, OpenAI rendering of the core's events, SSE."""
