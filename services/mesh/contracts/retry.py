"""How long a caller should wait before retrying when the mesh cannot serve it now (a full
queue, no serving instance): the Retry-After the edge and Envoy answer with."""

RETRY_AFTER_S = 1
