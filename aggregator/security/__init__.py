"""Trust and hardening: TLS material, caller identity, what may reach upstreams, limits."""
