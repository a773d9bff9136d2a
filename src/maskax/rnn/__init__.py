"""Padded scans over GRU/LSTM cells, mask-aware layers and decoding."""
