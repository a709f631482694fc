"""Control plane assembly: supervision tree, HTTP and agent plane, records, registration."""
