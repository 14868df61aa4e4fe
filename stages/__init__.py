"""Pipeline stages: extract, score and train."""
