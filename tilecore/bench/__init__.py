"""`tilecore bench`: latency, throughput, stage costs and memory of bundles, per backend and precision."""
