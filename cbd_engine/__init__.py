"""CBD engine: shapes, architecture adapters, transforms, distillation and evaluation. No web, no database."""

__version__ = "0.2.0"  # 0.2: unit mix, alpha auto by default, calibration everywhere, dev split
