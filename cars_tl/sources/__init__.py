"""Where datasets and weights come from: downloads, mirrors, archives, local layouts, the demo data."""
