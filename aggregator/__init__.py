"""aggregator: fan a batch of REST and gRPC calls out at once; stream results as they complete."""
