"""The edge's HTTP routes, one APIRouter per family of endpoints."""
