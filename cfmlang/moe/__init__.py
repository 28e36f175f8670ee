"""Building mixtures of experts: FFN neuron partitions, routers, calibration, and router
initialisation from prompts for MoE made of dense fine-tunes."""
