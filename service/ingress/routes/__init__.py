"""One router per resource: classification, KServe V2 (everything under /v2), metrics."""
