"""Generated gRPC stubs; run `make protos` after editing protos/."""
