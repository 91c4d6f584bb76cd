"""Layer 3: data. Instruction rows and the contract's splits, prompt formats and encoded batches, calibration sets."""
