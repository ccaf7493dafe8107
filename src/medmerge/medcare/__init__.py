"""MedCare two-stage training (arXiv 2406.17484): knowledge aggregation, then orthogonal alignment."""
