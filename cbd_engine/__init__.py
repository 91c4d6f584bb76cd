"""CBD engine: shapes, architecture adapters, transforms, distillation and evaluation. No web, no database."""

__version__ = "0.1.0"
