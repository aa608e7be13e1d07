"""Where the real pretrained weights come from, and small definitions for the ones that need our own code."""
