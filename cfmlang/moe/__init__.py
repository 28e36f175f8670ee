"""Building routed experts: FFN neuron partitions, routers, calibration."""
