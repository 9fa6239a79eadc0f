-- The CA certificate (PEM) a cluster's server certificate chains to: workers verify
-- against it, and tenants download it (GET /v1/clusters/{id}/ca.pem) for verify-full.
alter table clusters add column ca_pem text;
