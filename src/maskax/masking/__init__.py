"""What counts: masks, masked losses with named normalisations, loss sampling, metrics."""
