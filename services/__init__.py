"""Sluice: the mesh's services."""

import os

# `sluice up` starts its children with fork + exec while its own gRPC channels may be polling.
# gRPC's fork handlers then run in the child before exec and can abort it (SIGABRT in
# ev_epoll1_linux.cc: a child died before it was ready). No Sluice process uses gRPC across a
# fork, so they are off unless the environment turns them on; set before any import of grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
