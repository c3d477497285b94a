"""SLSA provenance that travels with a signing request, and its signature (issue 6)."""
