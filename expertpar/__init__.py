"""expertpar: sparse-MoE vision-language training with experts on Ray."""
__version__ = "0.1.0"
