"""Cloud provider clients (GCP: Cloud Storage + Compute Engine over REST)."""
