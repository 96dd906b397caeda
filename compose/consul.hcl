# The Consul agent's TLS material for the gRPC health checks it runs against the Sluice
# services (they require a client certificate from the mesh CA).
tls {
  defaults {
    ca_file         = "/certs/ca.crt"
    cert_file       = "/certs/consul.crt"
    key_file        = "/certs/consul.key"
    verify_outgoing = true
  }
}
