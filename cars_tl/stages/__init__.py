"""One module per pipeline stage; no stage imports another."""
