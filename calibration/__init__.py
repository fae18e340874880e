"""Head-priority calibration (gap x std per KV head), installed as ``hf_turbo.calibration``.

    from hf_turbo.calibration import calibrate, apply_calibration
    cal = calibrate(model, tokenizer, text_file="botchan", int2_fraction=0.25)  # also sets model.config.turbo_config
    cal.save("calibration.json")                                              # standalone JSON
    model.save_pretrained(out)                                                # config.json keeps the priorities
    apply_calibration(other_model, "calibration.json")                        # ValueError for another model

CLI: ``hf-turbo calibrate`` / ``python -m hf_turbo.calibration`` (see :mod:`hf_turbo.calibration.cli`).
"""

from .calibrate import (
    CAPTURE_NAME,
    Calibration,
    CalibrationTextError,
    HeadStats,
    apply_calibration,
    calibrate,
    calibration_from_stats,
    capture_attention,
    check_fingerprint,
    collect_stats,
    load_calibration,
    model_fingerprint,
    resolve_texts,
    token_samples,
)

__all__ = [
    "CAPTURE_NAME",
    "Calibration",
    "CalibrationTextError",
    "HeadStats",
    "apply_calibration",
    "calibrate",
    "calibration_from_stats",
    "capture_attention",
    "check_fingerprint",
    "collect_stats",
    "load_calibration",
    "model_fingerprint",
    "resolve_texts",
    "token_samples",
]
