"""Head-priority calibration (gap x std per KV head), installed as ``hf_turbo.calibration``."""
