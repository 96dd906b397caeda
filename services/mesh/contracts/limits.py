"""Bounds on what a request may ask for, checked where it enters the mesh and again by the
service that does the work."""

# Alternatives per token a request may ask log probabilities for (OpenAI's own bound).
MAX_TOP_LOGPROBS = 20
