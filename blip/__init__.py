"""blip: BLIP and BLIP-2 in modern PyTorch."""
