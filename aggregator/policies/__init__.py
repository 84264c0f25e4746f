"""Per-upstream policies that wrap any Upstream the same way: limits, breaker, retries, hedging."""
