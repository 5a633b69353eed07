"""One router per resource: classification, health, models, metrics."""
